"""`wm play`: watch an agent at once. A GIF of it driving a real track, beside what V sees and
what M dreams, from the small agent shipped with the package (or any `wm pack-agent` folder).

Left: the real env. Middle (green): V's reconstruction of each frame, what C reads. Right (red):
M's dream, branched off the real episode every `dream_every` steps: from there M draws each next
z itself while C drives on the dreamed z, as in the dream C was evolved in; it drifts from the
real track until the next branch. Also writes one frame as a PNG. Nothing is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen_core.config import setting
from gen_core.io import atomic_path
from gen_core.runs import RunConfig, start_run
from gen_core.vae import images_to_uint8
from rollouts.recording import make_env
from worldmodels.agent import FrameSettings, WorldModelAgent
from worldmodels.controller import controller_obs
from worldmodels.models import SHIPPED_AGENT, load_packed_agent
from worldmodels.real_env import eval_seeds
from worldmodels.video import framed, write_gif

GREEN, RED = (0, 200, 0), (220, 0, 0)  # seen, dreamed (the stages' convention)


@dataclass
class PlayConfig(RunConfig):
    """Settings of `wm play`."""

    agent: str = setting("", "packed agent folder (default: the one shipped with the package)")
    steps: int = setting(300, "real steps played and shown", min=1)
    track: int = setting(0, "evaluation track (wm evaluate's track of this index)", min=0)
    dream_every: int = setting(60, "steps between the dream's branches off the real state", min=1)
    every: int = setting(2, "GIF keeps every n-th step (25 frames/s)", min=1)
    scale: int = setting(2, "pixel zoom of the GIF", min=1)
    out: str = setting("", "GIF path (default: <run_dir>/play/play.gif; the PNG beside it)")


def panel(img: np.ndarray, height: int, colour=None) -> np.ndarray:
    """A picture scaled to `height` (nearest), with a border of `colour` if given."""
    if img.shape[0] != height:
        img = np.asarray(Image.fromarray(img).resize((height, height), Image.Resampling.NEAREST))
    return framed(img, colour) if colour else img


@torch.no_grad()
def play(agent: WorldModelAgent, env, seed: int, steps: int, dream_every: int, tau: float):
    """Rows (real frame, V's reconstruction, M's dream) of one episode, uint8 (H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    stepper = agent.stepper
    obs, _ = env.reset(seed=seed)
    agent.reset(seed)
    rows = []
    for t in range(steps):
        branch = t % dream_every == 0
        if branch:  # M's memory before it reads this frame: where a dream from here starts
            d_state = agent.state.take(torch.zeros(1, dtype=torch.long))
        action = agent(obs)
        if branch:
            dz = agent.last_z
        recon = agent.reconstruction()
        dream = images_to_uint8(agent.vae.decode(dz))[0].numpy()
        rows.append((obs, recon, dream))
        # The dream runs on: C acts on the dreamed z and M's dreamed memory, M draws what follows.
        x = controller_obs(dz, stepper.features(d_state), agent.spec)
        s = stepper.step(d_state, dz, agent.controller(x[None])[0], tau, g)
        dz, d_state = s.z, s.state
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    return rows


def compose(row: tuple[np.ndarray, ...], scale: int) -> np.ndarray:
    real, recon, dream = row
    h = real.shape[0]
    gap = np.full((h, 2, 3), 255, np.uint8)
    out = np.concatenate([real, gap, panel(recon, h, GREEN), gap, panel(dream, h, RED)], axis=1)
    size = (out.shape[1] * scale, out.shape[0] * scale)
    return np.asarray(Image.fromarray(out).resize(size, Image.Resampling.NEAREST))


def main(cfg: PlayConfig) -> int:
    t0 = time.perf_counter()
    run = start_run(cfg, "play")
    vae, m, params, spec, record = load_packed_agent(cfg.agent or SHIPPED_AGENT)
    models = record["models"]
    agent = WorldModelAgent(vae, m, spec, FrameSettings(**models["frames"]), params=params)
    env = make_env(models["env_id"], cfg.steps)
    seed = eval_seeds(cfg.seed, cfg.track + 1)[-1]
    rows = play(agent, env, seed, cfg.steps, cfg.dream_every, models["temperature"])
    env.close()
    frames = [compose(r, cfg.scale) for r in rows[:: cfg.every]]
    gif = Path(cfg.out) if cfg.out else run.dir / "play.gif"
    write_gif(gif, frames)
    png = gif.with_suffix(".png")
    with atomic_path(png, suffix=".png") as tmp:
        Image.fromarray(frames[len(frames) // 2]).save(tmp, format="PNG")
    run.log.info(
        f"play: {len(rows)} steps of track {cfg.track} (env seed {seed}) by "
        f"{cfg.agent or SHIPPED_AGENT} -> {gif} and {png.name} in {time.perf_counter() - t0:.1f} s"
    )
    run.close()
    return 0
