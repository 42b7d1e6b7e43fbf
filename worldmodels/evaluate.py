"""`wm evaluate`: score a controller (or a baseline policy) over N real-env episodes.

Episodes run in parallel Ray actors on tracks that training never saw (seeds from a separate
range, `worldmodels.real_env.eval_seeds`). Writes `<run_dir>/evaluate/<name>/score.json` (mean,
std, every return) and, for a controller, a GIF of one episode with V's reconstruction beside
the real frame. The controller defaults to the run's last round, with the M it was evolved with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gen_core.config import setting
from gen_core.io import atomic_write_text
from gen_core.runs import RunConfig, cores, progress, start_run
from rollouts.parallel import ActorPool
from rollouts.recording import make_env
from worldmodels.agent import WorldModelAgent, load_driver, play_episode
from worldmodels.layout import CONTROLLER_FOLDER, M_FOLDER, RunLayout
from worldmodels.real_env import RealEnvWorker, eval_seeds
from worldmodels.video import side_by_side, write_gif


@dataclass
class EvaluateConfig(RunConfig):
    """Settings of `wm evaluate`."""

    policy: str = setting(
        "controller",
        "controller (the trained C), or a baseline: uniform, correlated, explore, constant",
    )
    policy_params: dict[str, Any] = setting(
        {}, "baseline policy arguments, e.g. {action: [0, 1, 0]}"
    )
    controller: str = setting(
        "", f"controller checkpoint (default: the run's last round, {CONTROLLER_FOLDER}[_iterK])"
    )
    params: Literal["auto", "scored", "mean", "best"] = setting(
        "auto", "which parameters: scored (best evaluated mean), mean, best candidate; auto"
    )
    vae: str = setting("", "V checkpoint (default: <run_dir>/vae/checkpoints)")
    m: str = setting("", f"M checkpoint (default: the run's last round, {M_FOLDER}[_iterK])")
    store: str = setting("", "episode store V was trained on (default: <run_dir>/store)")
    episodes: int = setting(100, "real-env episodes (tracks)", min=1)
    env_id: str = setting("CarRacingFast-v3", "gymnasium env id")
    max_steps: int = setting(1000, "steps per episode", min=1)
    workers: int | None = setting(None, "Ray workers (default: one per core)", min=1)
    ray_address: str | None = setting(None, "existing Ray cluster address (default: local)")
    gif: bool = setting(True, "write a GIF of the first episode (controller: with V's view)")
    gif_steps: int = setting(300, "steps shown in the GIF", min=1)
    name: str = setting("", "output name under <run_dir>/evaluate/ (default: the policy name)")

    def n_workers(self) -> int:
        return self.workers or cores()


def main(cfg: EvaluateConfig) -> int:
    layout = RunLayout.of(cfg)
    run = start_run(cfg, "evaluate", folder=layout.evaluate.name)
    name = cfg.name or cfg.policy
    parts, params, controller = None, None, None
    if cfg.policy == "controller":
        k = layout.last_round()  # C and the M it was evolved with belong to the same round
        controller = Path(cfg.controller or layout.controller_checkpoints(k))
        parts, params = load_driver(
            controller,
            Path(cfg.vae or layout.vae_checkpoints),
            Path(cfg.m or layout.m_checkpoints(k)),
            Path(cfg.store or layout.store),
            cfg.params,
        )
    seeds = eval_seeds(cfg.seed, cfg.episodes)
    returns = np.zeros(cfg.episodes)
    pool = ActorPool(
        RealEnvWorker,
        (parts, cfg.env_id, cfg.max_steps, cfg.policy, cfg.policy_params),
        n=min(cfg.n_workers(), cfg.episodes),
        ray_address=cfg.ray_address,
    )
    bar = progress(total=cfg.episodes, desc=f"evaluate {name}", unit="ep", disable=not cfg.progress)
    try:
        items = [(i, params, s) for i, s in enumerate(seeds)]
        for (i, _, _), ret in pool.map_unordered("play", items):
            returns[i] = ret
            bar.update(1)
            bar.set_postfix(ret=f"{ret:.0f}")
    finally:
        bar.close()
        pool.close()
    out = layout.evaluation(name)
    out.mkdir(parents=True, exist_ok=True)
    score = {
        "policy": cfg.policy,
        "mean": float(returns.mean()),
        "std": float(returns.std()),
        "episodes": cfg.episodes,
        "max_steps": cfg.max_steps,
        "env_id": cfg.env_id,
        "seeds": seeds,  # the tracks, so another scorer can tell it has the same ones
        "controller": str(controller) if controller else None,  # which C was scored
        "returns": [round(float(r), 2) for r in returns],
    }
    atomic_write_text(layout.score(name), json.dumps(score, indent=2) + "\n")
    run.log.info(
        f"evaluate {name}: {returns.mean():.1f} +- {returns.std():.1f} over {cfg.episodes} "
        f"episodes ({layout.score(name)})"
    )
    if cfg.gif:
        env = make_env(cfg.env_id, cfg.max_steps)
        if parts is not None:
            policy = WorldModelAgent(*parts)
            policy.set_params(params)
        else:
            from rollouts.policies import make_policy

            policy = make_policy(cfg.policy, env.action_space, **cfg.policy_params)
        _, _, frames, recons = play_episode(env, policy, seeds[0], cfg.gif_steps, record=True)
        if recons:
            frames = [side_by_side(f, r) for f, r in zip(frames, recons)]
        write_gif(layout.episode_gif(name), frames[::2])
        run.log.info(f"evaluate {name}: GIF of episode 1 in {layout.episode_gif(name)}")
    print(json.dumps({k: v for k, v in score.items() if k != "returns"}))
    run.close()
    return 0
