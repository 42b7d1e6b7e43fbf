"""`wm dream-video`: a real episode beside M's dream of it, as a GIF.

Up to step `start` the right side shows V's reconstructions of the real frames (green frame).
There the dream takes over (red frame): M reads the `dream.warmup` real steps before `start`
(as every dream starts, `worldmodels/dream.py`), then draws each next z at `dream.temperature`
under the actions the episode really took, decoded with V. Left: the real frames. This is what
to look at before trusting M, whichever M it is.
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
from worldmodels.dream import DreamConfig, DreamStarts
from worldmodels.layout import RunLayout
from worldmodels.models import load_m, load_vae
from worldmodels.video import framed, write_gif


@dataclass
class DreamVideoConfig(RunConfig):
    """Settings of `wm dream-video`."""

    store: str = setting("", "episode store (default: <run_dir>/store)")
    vae: str = setting("", "V checkpoint (default: <run_dir>/vae/checkpoints)")
    m: str = setting("", "M checkpoint (default: <run_dir>/m/checkpoints)")
    episode: int = setting(-1, "stored episode to show (-1: the last one)")
    start: int = setting(60, "step of the episode where the dream takes over", min=1)
    steps: int = setting(150, "dreamed steps", min=1)
    dream: DreamConfig = setting(default_factory=DreamConfig, doc="how M dreams")
    scale: int = setting(3, "pixel zoom of the GIF", min=1)
    out: str = setting("", "GIF path (default: <run_dir>/dream/dream_ep<N>_t<temperature>.gif)")


@torch.no_grad()
def dream_frames(
    vae, m, obs: np.ndarray, actions: np.ndarray, start: int, steps: int, dream: DreamConfig,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """(real frames, reconstructed-then-dreamed frames) of one episode, uint8 (H, W, 3)."""
    n = min(start + steps, len(actions))
    mu, _ = vae.encode(images_to_float(torch.from_numpy(obs[: n + 1])))  # (n+1, z_dim)
    a = torch.from_numpy(actions[:n]).float()  # (n, A)
    recon = images_to_uint8(vae.decode(mu[:start]))  # (start, H, W, 3)
    first = max(0, start - dream.warmup)
    stepper = m.stepper()
    begin = DreamStarts.from_steps(stepper, mu[None, first : start + 1], a[None, first:start])
    g = torch.Generator().manual_seed(seed)
    z, state, dreamed = begin.z, begin.state, []
    for t in range(start, n):  # under the episode's own actions, past any dreamed end
        dreamed.append(z)
        s = stepper.step(state, z, a[t : t + 1], dream.temperature, g)
        z, state = s.z, s.state
    pictures = images_to_uint8(vae.decode(torch.cat(dreamed))) if dreamed else recon[:0]
    right = [framed(f, (0, 200, 0)) for f in recon.numpy()]
    right += [framed(f, (220, 0, 0)) for f in pictures.numpy()]
    return list(obs[:n]), right


def main(cfg: DreamVideoConfig) -> int:
    run = start_run(cfg, "dream")
    layout = RunLayout(cfg.run_dir)
    store = EpisodeStore(cfg.store or layout.store)
    indices = store.indices()
    if not indices:
        raise UserError(f"{store.path}: no episodes; run 'wm collect' first")
    index = indices[-1] if cfg.episode < 0 else cfg.episode
    if index not in indices:
        raise UserError(f"episode: {index} is not in {store.path} (it has {len(indices)})")
    ep = store.load(index, ("obs", "actions"))
    vae, _ = load_vae(cfg.vae or layout.vae_checkpoints)
    m, _ = load_m(cfg.m or layout.m_checkpoints())
    if len(ep["actions"]) <= cfg.start:
        raise UserError(
            f"start: episode {index} has {len(ep['actions'])} steps, fewer than start {cfg.start}"
        )
    real, right = dream_frames(
        vae, m, ep["obs"], ep["actions"], cfg.start, cfg.steps, cfg.dream, cfg.seed
    )
    gap = np.full((real[0].shape[0], 2, 3), 255, np.uint8)
    frames = []
    for r, d in zip(real, right):
        pair = np.concatenate([r, gap, d], axis=1)
        size = (pair.shape[1] * cfg.scale, pair.shape[0] * cfg.scale)
        frames.append(np.asarray(Image.fromarray(pair).resize(size, Image.Resampling.NEAREST)))
    tau = cfg.dream.temperature
    out = Path(cfg.out) if cfg.out else run.dir / f"dream_ep{index}_t{tau:g}.gif"
    write_gif(out, frames)
    run.log.info(
        f"dream-video: episode {index}, {cfg.start} real + {len(frames) - cfg.start} dreamed "
        f"frames at temperature {tau:g} -> {out}"
    )
    run.close()
    return 0
