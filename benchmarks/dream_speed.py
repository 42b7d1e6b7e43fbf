"""Dream speed: env-steps/s of a whole CMA-ES population in M's dream, against the real env and
against evaluating the same candidates one at a time in the dream.

Uses the toolkit's own fitness path (`worldmodels.train_controller.DreamFitness`, which calls
`dream_returns`) with M at World Models' size (z 32, hidden 256, 5 mixtures) and a linear
controller on [z, h]. Speed does not depend on M's weights, so an untrained M is used.

- dream_steps_per_s: population x trials rollouts advanced together as one batch.
- one_at_a_time_steps_per_s: the same rollouts, one candidate (its trials) per call.
- real_steps_per_s: CarRacingFast-v3 stepped with random actions in one process (env only: V and
  M would make the real side slower still).

    python benchmarks/dream_speed.py [--population 64] [--trials 16] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

from gen_core.mdnrnn import MDNRNN, MDNRNNConfig
from rollouts.collect import make_env
from worldmodels.controller import ControllerSpec
from worldmodels.dream import StartStates
from worldmodels.train_controller import DreamFitness


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--real-steps", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    m = MDNRNN(MDNRNNConfig()).eval()
    spec = ControllerSpec()
    start = StartStates(torch.randn(256, 32), torch.zeros(256, 256), torch.zeros(256, 256))
    cfg = SimpleNamespace(
        seed=0, trials=args.trials, dream_steps=args.steps, temperature=1.0, done_threshold=1.1
    )  # no early ends: every rollout runs all steps
    fitness = DreamFitness(m, start, spec, cfg, torch.device("cpu"))
    params = np.random.default_rng(0).normal(0, 0.1, (args.population, spec.n_params))
    fitness(params[:2], 0)  # warm-up

    t0 = time.perf_counter()
    fitness(params, 1)
    batched_s = time.perf_counter() - t0
    total = args.population * args.trials * args.steps
    dream_sps = total / batched_s

    t0 = time.perf_counter()
    for i in range(args.population):
        fitness(params[i : i + 1], 1)
    single_sps = total / (time.perf_counter() - t0)

    env = make_env("CarRacingFast-v3", args.real_steps + 1)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform([-1, 0, 0], [1, 1, 1], (args.real_steps, 3)).astype(np.float32)
    t0 = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset(seed=1)
    real_sps = args.real_steps / (time.perf_counter() - t0)

    print(
        f"dream (batch {args.population}x{args.trials}): {dream_sps:,.0f} steps/s; "
        f"one candidate at a time: {single_sps:,.0f}; real env: {real_sps:,.0f}"
    )
    print(
        json.dumps(
            {
                "name": "dream_speed",
                "dream_steps_per_s": round(dream_sps, 1),
                "one_at_a_time_steps_per_s": round(single_sps, 1),
                "real_steps_per_s": round(real_sps, 1),
                "ratio_vs_real": round(dream_sps / real_sps, 1),
                "ratio_vs_one_at_a_time": round(dream_sps / single_sps, 2),
                "population": args.population,
                "trials": args.trials,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "units": "environment steps per second (one step = one rollout advanced one frame)",
            }
        )
    )


if __name__ == "__main__":
    main()
