"""Dream speed: env-steps/s of a whole CMA-ES population in M's dream, against the real env and
against evaluating the same candidates one at a time in the dream.

Every rate is environment steps per second (one step = one rollout advanced one frame):

- dream_steps_per_s: the toolkit's dream fitness (`worldmodels.train_controller.DreamFitness`,
  through `dream_returns`) on the whole population at once, population x trials rollouts as one
  batch, on `threads` torch threads (all cores by default).
- one_at_a_time_steps_per_s: the same fitness on the same candidates, one candidate (its trials)
  per call, same threads (timed over the first `--one-at-a-time` candidates: the rate does not
  depend on which).
- one_rollout_at_a_time_steps_per_s: the same fitness, one rollout (one trial of one candidate)
  per call, as public World Models code evaluates candidates (timed over 2 candidates).
- real_steps_per_s: CarRacingFast-v3 alone (env.step with random actions; no V, M or C), one
  process. The toolkit's fast env, pixel-identical to stock.
- stock_real_steps_per_s: stock gymnasium CarRacing-v3 alone, the same way.
- real_fitness_steps_per_s: a real-env fitness evaluation as `wm train-controller mode=real` runs
  it in each worker: env step (CarRacingFast-v3) + V encoding the frame + C + M's step
  (`worldmodels.agent.WorldModelAgent`), one process, one torch thread. That pipeline runs one
  such worker per core, so on this machine real mode can reach up to `cores` times this rate,
  while the dream rates use all cores.

M is at World Models' size (z 32, hidden 256, 5 mixtures), V is gen_core.vae's default (64x64
frames, z 32), C is linear on [z, h]. Speed does not depend on weights, so all are untrained, and
no dream rollout ends early (done threshold above 1).

The six measurements run in turn, `--rounds` times (order rotated each round), so load from other
processes hits all alike; rates are medians over rounds and ratios medians of per-round ratios.
Env resets are not timed. `load_avg_1m` (start and end) shows whether the machine was shared.
OMP_WAIT_POLICY is PASSIVE unless set otherwise, as in the toolkit (recorded as `omp_wait_policy`).

    python benchmarks/dream_speed.py [--population 64] [--trials 16] [--steps 100] [--bf16]
        [--m lstm|transformer]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

# As the toolkit runs (gen_core sets it before torch loads; OpenMP reads it only then): idle
# OpenMP threads sleep instead of spinning, which on a busy machine is ~10x faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
OMP_WAIT_POLICY = os.environ["OMP_WAIT_POLICY"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gen_core.mdn_transformer import MDNTransformer, MDNTransformerConfig  # noqa: E402
from gen_core.mdnrnn import MDNRNN, MDNRNNConfig  # noqa: E402
from gen_core.vae import VAE, VAEConfig  # noqa: E402
from rollouts.recording import make_env  # noqa: E402
from worldmodels.agent import FrameSettings, WorldModelAgent  # noqa: E402
from worldmodels.controller import ControllerSpec  # noqa: E402
from worldmodels.dream import DreamConfig, DreamStarts  # noqa: E402
from worldmodels.train_controller import DreamFitness  # noqa: E402


def env_rate(env, steps: int, seed: int, act) -> float:
    """Steps/s of `steps` env steps from a fresh episode; `act(obs)` picks each action."""
    obs, _ = env.reset(seed=seed)
    elapsed = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        obs, _, term, trunc, _ = env.step(act(obs))
        elapsed += time.perf_counter() - t0
        if term or trunc:
            obs, _ = env.reset(seed=seed + 1)  # not timed
    return steps / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--steps", type=int, default=100, help="dream steps per rollout")
    p.add_argument("--real-steps", type=int, default=300, help="real env steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--one-at-a-time", type=int, default=16, help="candidates timed one call each per round"
    )
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--bf16", action="store_true", help="dream with M's matmuls in bfloat16")
    p.add_argument(
        "--m",
        choices=["lstm", "transformer"],
        default="lstm",
        help="M: the MDN-RNN (World "
        "Models' size) or a Transformer M of the same width (2 blocks, 50-step window)",
    )
    args = p.parse_args()
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    if args.m == "lstm":
        m = MDNRNN(MDNRNNConfig()).eval()
    else:
        m = MDNTransformer(MDNTransformerConfig(n_embd=256, n_layer=2, window=50)).eval()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    stepper = m.stepper(dtype)
    spec = ControllerSpec(hidden=stepper.feature_dim)
    start = DreamStarts.from_steps(stepper, torch.randn(256, 11, 32), torch.rand(256, 10, 3))
    cfg = SimpleNamespace(
        seed=0,
        trials=args.trials,
        dream_steps=args.steps,
        dream=DreamConfig(temperature=1.0, end_threshold=1.0),
    )  # no early ends: every rollout runs all steps
    fitness = DreamFitness(stepper, start, spec, cfg, torch.device("cpu"))
    params = np.random.default_rng(0).normal(0, 0.1, (args.population, spec.n_params))
    singles = min(args.one_at_a_time, args.population)

    def batched() -> float:
        t0 = time.perf_counter()
        fitness(params, 1)
        return args.population * args.trials * args.steps / (time.perf_counter() - t0)

    def one_at_a_time() -> float:
        t0 = time.perf_counter()
        for i in range(singles):
            fitness(params[i : i + 1], 1)
        return singles * args.trials * args.steps / (time.perf_counter() - t0)

    def one_rollout_at_a_time() -> float:
        # As public World Models code evaluates a candidate: its trials one after another.
        n = 2
        t0 = time.perf_counter()
        for i in range(n):
            for _ in range(args.trials):
                fitness(params[i : i + 1], 1, trials=1)
        return n * args.trials * args.steps / (time.perf_counter() - t0)

    fast_env = make_env("CarRacingFast-v3", args.real_steps + 1)
    stock_env = make_env("CarRacing-v3", args.real_steps + 1)
    rng = np.random.default_rng(0)
    low, high = np.array([-1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])

    def random_action(_obs) -> np.ndarray:
        return rng.uniform(low, high).astype(np.float32)

    vae = VAE(VAEConfig()).eval()
    agent = WorldModelAgent(vae, m, spec, FrameSettings(size=64), params[0])

    def real_fitness(seed: int) -> float:
        torch.set_num_threads(1)  # as each real-env worker runs
        try:
            agent.reset()
            return env_rate(fast_env, args.real_steps, seed, agent)
        finally:
            torch.set_num_threads(args.threads)

    torch.set_num_threads(args.threads)
    fitness(params[:2], 0)  # warm-up
    fitness(params[:1], 0)
    real_fitness(99)

    tasks = {
        "dream": batched,
        "one_at_a_time": one_at_a_time,
        "one_rollout_at_a_time": one_rollout_at_a_time,
        "real": lambda r: env_rate(fast_env, args.real_steps, r, random_action),
        "stock_real": lambda r: env_rate(stock_env, args.real_steps, r, random_action),
        "real_fitness": real_fitness,
    }
    rates: dict[str, list[float]] = {k: [] for k in tasks}
    names = list(tasks)
    for r in range(args.rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            rates[k].append(tasks[k]() if k.startswith(("dream", "one")) else tasks[k](r))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"dream (batch {args.population}x{args.trials}, {dtype}): {med['dream']:,.0f} steps/s; "
        f"one candidate at a time: {med['one_at_a_time']:,.0f}; real env (fast): "
        f"{med['real']:,.0f}; stock: {med['stock_real']:,.0f}; real fitness (env + V + M + C, "
        f"1 thread): {med['real_fitness']:,.0f}"
    )
    print(
        json.dumps(
            {
                "name": "dream_speed",
                "m": args.m,
                "dream_steps_per_s": round(med["dream"], 1),
                "one_at_a_time_steps_per_s": round(med["one_at_a_time"], 1),
                "real_steps_per_s": round(med["real"], 1),
                "stock_real_steps_per_s": round(med["stock_real"], 1),
                "real_fitness_steps_per_s": round(med["real_fitness"], 1),
                "ratio_vs_real": round(ratio("dream", "real"), 1),
                "ratio_vs_stock_real": round(ratio("dream", "stock_real"), 1),
                "ratio_vs_real_fitness": round(ratio("dream", "real_fitness"), 1),
                "ratio_vs_one_at_a_time": round(ratio("dream", "one_at_a_time"), 2),
                "one_rollout_at_a_time_steps_per_s": round(med["one_rollout_at_a_time"], 1),
                "ratio_vs_one_rollout_at_a_time": round(ratio("dream", "one_rollout_at_a_time"), 1),
                "population": args.population,
                "trials": args.trials,
                "steps": args.steps,
                "one_at_a_time_candidates": singles,
                "real_steps": args.real_steps,
                "rounds": args.rounds,
                "dtype": str(dtype).removeprefix("torch."),
                "threads": args.threads,
                "cores": os.cpu_count(),
                "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                "omp_wait_policy": OMP_WAIT_POLICY,
                "units": "environment steps per second (one step = one rollout advanced one frame)",
            }
        )
    )


if __name__ == "__main__":
    main()
