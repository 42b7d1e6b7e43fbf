"""Frames into pictures and GIFs: what the stages that show episodes share.

`wm evaluate` (the real frame beside V's view), `wm dream-video` (a real episode beside M's
dream of it) and `wm fidelity` (strips of dreams) write their GIFs and framed frames with these.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gen_core.io import atomic_path


def write_gif(path: Path, frames: list[np.ndarray], fps: int = 25) -> None:
    """Write RGB frames (H, W, 3) uint8 as a looping GIF, atomically."""
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path, suffix=".gif") as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=int(1000 / fps),
            loop=0,
        )


def side_by_side(real: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """The env frame and V's reconstruction, scaled to the same height, side by side."""
    h = real.shape[0]
    rec = np.asarray(Image.fromarray(recon).resize((h, h), Image.Resampling.NEAREST))
    gap = np.full((h, 2, 3), 255, np.uint8)
    return np.concatenate([real, gap, rec], axis=1)


def framed(img: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """A copy of a picture (H, W, 3) with a 2-pixel border of `colour` (green: seen, red:
    dreamed, by the stages' convention)."""
    out = img.copy()
    out[:2], out[-2:], out[:, :2], out[:, -2:] = colour, colour, colour, colour
    return out
