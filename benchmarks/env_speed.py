"""Env steps per second of CarRacingFast-v3 against stock CarRacing-v3, single process.

Both envs start from the same seed and take the same pre-drawn random actions (resetting with the
same seeds when an episode ends). They run in alternating chunks so that load from other
processes hits both alike, and every fast observation is compared with stock's from the same
chunk. Only ``step`` and ``reset`` calls are timed.

Prints human-readable lines, then one JSON object as the last line.

    python benchmarks/env_speed.py [--steps N] [--chunk N] [--seed N]
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import rollouts.envs  # noqa: E402, F401  (registers CarRacingFast-v3)


def _run_chunk(env, actions, reset_seeds, start: int, stop: int):
    """Steps ``env`` through actions[start:stop]; returns (seconds, observations, outcomes)."""
    observations, outcomes = [], []
    elapsed = 0.0
    for i in range(start, stop):
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, _ = env.step(actions[i])
        if terminated or truncated:
            env.reset(seed=int(reset_seeds[i]))
        elapsed += time.perf_counter() - t0
        observations.append(obs)
        outcomes.append((reward, terminated, truncated))
    return elapsed, observations, outcomes


def run(steps: int = 1500, chunk: int = 100, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    actions = rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 1.0], size=(steps, 3)).astype(np.float32)
    reset_seeds = rng.integers(0, 2**31 - 1, size=steps)

    stock, fast = gym.make("CarRacing-v3"), gym.make("CarRacingFast-v3")
    obs_s, _ = stock.reset(seed=seed)
    obs_f, _ = fast.reset(seed=seed)
    identical = bool(np.array_equal(obs_s, obs_f))
    first_mismatch = None if identical else -1

    t_stock = t_fast = 0.0
    for n, start in enumerate(range(0, steps, chunk)):
        stop = min(start + chunk, steps)
        # Alternate which env goes first so neither always runs right after the other's work.
        order = (stock, fast) if n % 2 == 0 else (fast, stock)
        results = {id(env): _run_chunk(env, actions, reset_seeds, start, stop) for env in order}
        dt_s, obs_list_s, out_s = results[id(stock)]
        dt_f, obs_list_f, out_f = results[id(fast)]
        t_stock += dt_s
        t_fast += dt_f
        for i, (a, b) in enumerate(zip(obs_list_s, obs_list_f, strict=True)):
            if identical and (not np.array_equal(a, b) or out_s[i] != out_f[i]):
                identical = False
                first_mismatch = start + i
    stock.close()
    fast.close()

    stock_sps = steps / t_stock
    fast_sps = steps / t_fast
    print(f"stock CarRacing-v3:     {stock_sps:8.1f} steps/s ({t_stock:.2f} s for {steps} steps)")
    print(f"CarRacingFast-v3:       {fast_sps:8.1f} steps/s ({t_fast:.2f} s for {steps} steps)")
    print(f"speed-up:               {fast_sps / stock_sps:8.2f}x")
    print(
        f"observations identical: {identical}"
        + (f" (first mismatch at step {first_mismatch})" if not identical else "")
    )
    return {
        "name": "env_speed",
        "fast_steps_per_s": round(fast_sps, 1),
        "stock_steps_per_s": round(stock_sps, 1),
        "ratio": round(fast_sps / stock_sps, 2),
        "identical": identical,
        "steps": steps,
        "units": "env steps per second, single process",
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="env steps per env")
    parser.add_argument("--chunk", type=int, default=100, help="steps per alternating chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(run(steps=args.steps, chunk=args.chunk, seed=args.seed)))
