"""Stable-Baselines3's PPO trained entirely inside a run's dream, then scored in the real env.

    pip install -e ".[sb3]"
    python examples/sb3_ppo_dream.py --run runs/carracing_small --episodes 100

PPO sees what C sees, [z, h], in the same dream CMA-ES evolves C in (`worldmodels/Dream-v0`,
built from the run's V, M and encoded episodes by `worldmodels.rl_envs.dream_from_run`); the
dream is a plain gymnasium env, so SB3 takes it through its own `make_vec_env` (one DreamEnv per
sub-env, each with its own seed and Monitor). In the real env the policy then acts through the
same V and M memory as C (`WorldModelAgent(act=...)`), on the tracks `wm evaluate` scores
(`eval_seeds`), beside the run's CMA-ES controller on the same tracks. Writes
<run>/sb3_ppo/ppo.zip and score.json, and prints score.json's figures as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gen_core.io import atomic_write_text
from rollouts.store import open_store
from worldmodels.agent import WorldModelAgent, load_driver
from worldmodels.dream import DREAM_ENV_ID, DreamConfig
from worldmodels.layout import RunLayout
from worldmodels.real_env import eval_seeds, real_returns
from worldmodels.rl_envs import dream_from_run

try:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
except ImportError:
    sys.exit('this example needs Stable-Baselines3: pip install -e ".[sb3]"')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run folder (V, M, latents, store)")
    p.add_argument("--timesteps", type=int, default=500_000, help="PPO's steps in the dream")
    p.add_argument("--n-envs", type=int, default=8, help="dreams PPO steps together")
    p.add_argument("--n-steps", type=int, default=256, help="PPO rollout length per dream")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-epochs", type=int, default=4)
    p.add_argument("--dream-steps", type=int, default=300, help="the dream's time limit")
    p.add_argument("--temperature", type=float, default=1.15, help="the dream's tau")
    p.add_argument("--episodes", type=int, default=100, help="real tracks scored (0: none)")
    p.add_argument("--max-steps", type=int, default=1000, help="steps per real episode")
    p.add_argument("--seed", type=int, default=0, help="PPO's seed and the tracks' run seed")
    return p.parse_args(argv)


def train(args: argparse.Namespace):
    """(PPO trained in the run's dream, the agent's parts, seconds it took)."""
    dream = DreamConfig(temperature=args.temperature)
    kwargs, parts = dream_from_run(args.run, dream, max_steps=args.dream_steps, seed=args.seed)
    envs = make_vec_env(DREAM_ENV_ID, n_envs=args.n_envs, seed=args.seed, env_kwargs=kwargs)
    model = PPO(
        "MlpPolicy",
        envs,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        seed=args.seed,
        device="cpu",  # a small MLP: the GPU would only add transfers
        verbose=0,
    )
    t0 = time.perf_counter()
    model.learn(total_timesteps=args.timesteps)
    return model, parts, time.perf_counter() - t0


def score(agent, env_id: str, seeds: list[int], max_steps: int) -> dict:
    t0 = time.perf_counter()
    r = real_returns(agent, env_id, seeds, max_steps)
    return {"mean": float(r.mean()), "std": float(r.std()), "returns": r.round(2).tolist(),
            "eval_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    layout = RunLayout(Path(args.run))
    model, parts, train_s = train(args)
    out = layout.root / "sb3_ppo"
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "ppo.zip")
    result = {
        "timesteps": int(model.num_timesteps),
        "train_s": round(train_s, 1),
        "episodes": args.episodes,
    }
    if args.episodes:
        env_id = open_store(layout.store).info()["env_id"]
        seeds = eval_seeds(args.seed, args.episodes)

        def act(obs: np.ndarray) -> np.ndarray:
            return model.predict(obs, deterministic=True)[0]

        result["ppo"] = score(WorldModelAgent(*parts, act=act), env_id, seeds, args.max_steps)
        k = layout.last_round()
        done = layout.score("controller")
        known = json.loads(done.read_text()) if done.is_file() else {}
        if known.get("seeds") == seeds and known.get("max_steps") == args.max_steps:
            # `wm evaluate` already scored the run's CMA-ES controller on these very tracks
            result["cmaes"] = {key: known[key] for key in ("mean", "std", "returns")}
            result["cmaes"]["from"] = str(done)
        elif layout.controller_checkpoints(k).is_dir():  # the CMA-ES controller, same tracks
            driver, params = load_driver(
                layout.controller_checkpoints(k), layout.vae_checkpoints, layout.m_checkpoints(k),
                layout.store,
            )  # fmt: skip
            agent = WorldModelAgent(*driver, params=params)
            result["cmaes"] = score(agent, env_id, seeds, args.max_steps)
    atomic_write_text(out / "score.json", json.dumps(result, indent=2) + "\n")
    brief = {k: v for k, v in result.items() if k not in ("ppo", "cmaes")}
    for name in ("ppo", "cmaes"):
        if name in result:
            brief |= {f"{name}_{k}": v for k, v in result[name].items() if k != "returns"}
    print(json.dumps(brief))
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # PPO's MLP and batch-1 dreams: more threads only contend
    main()
