"""`wm dream-video`: a real episode beside M's dream of it, as a GIF.

The first `context` frames of a stored episode are encoded with V and fed to M with the actions
taken, filling M's memory h. From there M dreams on alone: each next z is sampled at
`temperature`, under the actions the episode really took, and decoded with V. Left: the real
frames. Right: V's reconstructions during the context (green frame), then the dream (red frame).
This is what to look at before trusting M.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen_core.config import setting
from gen_core.errors import UserError
from gen_core.runs import RunConfig, start_run
from gen_core.vae import images_to_float, images_to_uint8
from rollouts.store import EpisodeStore
from worldmodels.agent import load_vae
from worldmodels.dream import dream_step
from worldmodels.evaluate import write_gif
from worldmodels.mdnrnn import load_mdnrnn


@dataclass
class DreamVideoConfig(RunConfig):
    """Settings of `wm dream-video`."""

    store: str = setting("", "episode store (default: <run_dir>/store)")
    vae: str = setting("", "V checkpoint (default: <run_dir>/vae/checkpoints)")
    mdnrnn: str = setting("", "M checkpoint (default: <run_dir>/mdnrnn/checkpoints)")
    episode: int = setting(-1, "stored episode to show (-1: the last one)")
    context: int = setting(60, "real frames fed to M before it dreams alone", min=1)
    steps: int = setting(150, "dreamed steps", min=1)
    temperature: float = setting(1.0, "sampling temperature of the dream", min=0.0)
    scale: int = setting(3, "pixel zoom of the GIF", min=1)
    out: str = setting("", "GIF path (default: <run_dir>/dream/dream_ep<N>_t<temperature>.gif)")


def framed(img: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """A copy of a picture (H, W, 3) with a 2-pixel border of `colour`."""
    out = img.copy()
    out[:2], out[-2:], out[:, :2], out[:, -2:] = colour, colour, colour, colour
    return out


@torch.no_grad()
def dream_frames(
    vae,
    mdnrnn,
    obs: np.ndarray,
    actions: np.ndarray,
    context: int,
    steps: int,
    temperature: float,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(real frames, reconstructed-then-dreamed frames) of one episode, uint8 (H, W, 3)."""
    n = min(context + steps, len(actions))
    mu, _ = vae.encode(images_to_float(torch.from_numpy(obs[: n + 1])))  # (n+1, z_dim)
    a = torch.from_numpy(actions[:n]).float()  # (n, A)
    state = mdnrnn(mu[None, :context], a[None, :context]).state  # h after the context
    recon = images_to_uint8(vae.decode(mu[:context]))  # (context, H, W, 3)
    g = torch.Generator().manual_seed(seed)
    z, h, c = mu[context : context + 1], state[0][0], state[1][0]
    dreamed = []
    for t in range(context, n):
        dreamed.append(z)
        s = dream_step(mdnrnn, z, h, c, a[t : t + 1], temperature, g)
        z, h, c = s.z, s.h, s.c
    dream = images_to_uint8(vae.decode(torch.cat(dreamed))) if dreamed else recon[:0]
    right = [framed(f, (0, 200, 0)) for f in recon.numpy()]
    right += [framed(f, (220, 0, 0)) for f in dream.numpy()]
    return list(obs[:n]), right


def main(cfg: DreamVideoConfig) -> int:
    run = start_run(cfg, "dream")
    store = EpisodeStore(cfg.path(cfg.store, "store"))
    indices = store.indices()
    if not indices:
        raise UserError(f"{store.path}: no episodes; run 'wm collect' first")
    index = indices[-1] if cfg.episode < 0 else cfg.episode
    if index not in indices:
        raise UserError(f"episode: {index} is not in {store.path} (it has {len(indices)})")
    ep = store.load(index, ("obs", "actions"))
    vae, _ = load_vae(cfg.path(cfg.vae, "vae/checkpoints"))
    mdnrnn, _ = load_mdnrnn(cfg.path(cfg.mdnrnn, "mdnrnn/checkpoints"))
    if len(ep["actions"]) <= cfg.context:
        raise UserError(
            f"context: episode {index} has {len(ep['actions'])} steps, fewer than context "
            f"{cfg.context}"
        )
    real, right = dream_frames(
        vae, mdnrnn, ep["obs"], ep["actions"], cfg.context, cfg.steps, cfg.temperature, cfg.seed
    )
    gap = np.full((real[0].shape[0], 2, 3), 255, np.uint8)
    frames = []
    for r, d in zip(real, right):
        pair = np.concatenate([r, gap, d], axis=1)
        frames.append(
            np.asarray(
                Image.fromarray(pair).resize(
                    (pair.shape[1] * cfg.scale, pair.shape[0] * cfg.scale), Image.Resampling.NEAREST
                )
            )
        )
    out = Path(cfg.out) if cfg.out else run.dir / f"dream_ep{index}_t{cfg.temperature:g}.gif"
    write_gif(out, frames)
    run.log.info(
        f"dream-video: episode {index}, {cfg.context} real + {len(frames) - cfg.context} dreamed "
        f"frames at temperature {cfg.temperature:g} -> {out}"
    )
    run.close()
    return 0
