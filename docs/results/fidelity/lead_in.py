"""Fidelity from states a driver reaches: the measurement behind "Starting where a driver has
taken the car" (README.md here). A diagnostic for a decision on the measurement, not a claim.

`wm fidelity` starts every policy on the start line after a 50-step standing warm-up, so a
constant policy meets each track's first bend from rest, and gas 0.5 runs straight across the
grass to the playfield's edge near step 270 on 11 of 16 tracks: one geometric event decides its
rank. The controller, though, is evolved from dream starts taken anywhere along real episodes
(`max_start`). Here each of the 16 tracks is first driven by a reference controller for a
number of steps drawn per track (after the same standing warm-up); then each fixed policy takes
over for `horizon` steps, for real (the lead-in's actions replayed, checked frame for frame) and
in the dream (V's encodings of the lead-in frames, M teacher-forced over them under the
recorded actions, as `wm fidelity` does over its warm-up).

    python docs/results/fidelity/lead_in.py --run final \\
        --driver runs/final/controller/checkpoints [--mdnrnn PATH] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gen_core.io import atomic_write_text
from gen_core.vae import images_to_float
from rollouts.collect import make_env, preprocess
from worldmodels.agent import WorldModelAgent, load_agent_parts
from worldmodels.evolve import load_controller_params
from worldmodels.fidelity import (
    FIDELITY_SEED_BASE,
    FIXED_POLICIES,
    FidelityResult,
    controller_mdnrnn,
    dream_returns_for,
    fixed_policy,
    mdnrnn_step,
    play_from_warmup,
    real_policy,
    start_states_from_frames,
)

ENV_ID = "CarRacingFast-v3"


def reference_driver(run: Path, driver: Path) -> WorldModelAgent:
    """The controller with the V and the M it was evolved with (it reads that M's memory)."""
    params, c_cfg = load_controller_params(driver)
    vae, mdnrnn, spec, frames = load_agent_parts(
        run / "vae/checkpoints", Path(controller_mdnrnn(c_cfg)), run / "store"
    )
    return WorldModelAgent(vae, mdnrnn, spec, frames, params)


def lead_in(agent: WorldModelAgent, seed: int, warmup: int, steps: int):
    """Frames (warmup + steps + 1) and actions (warmup + steps, 3) of the reference driver."""
    env = make_env(ENV_ID, 2000)
    obs, _ = env.reset(seed=seed)
    agent.reset(seed)
    seen, acts = [obs], []
    for t in range(warmup + steps):
        if t < warmup:
            a = np.zeros(3, np.float32)
            agent.observe(obs, a)
        else:
            a = agent(obs)
        obs, _, terminated, truncated, _ = env.step(a)
        seen.append(obs)
        acts.append(a)
        if terminated or truncated:
            raise SystemExit(f"track {seed}: the lead-in ended the episode at step {t + 1}")
    env.close()
    return np.stack(seen), np.stack(acts)


def real_after(item):
    """(return, ended) of one fixed policy after replaying a lead-in's actions."""
    name, seed, acts, last_frame, horizon = item
    env = make_env(ENV_ID, len(acts) + horizon + 1)
    policy = real_policy(fixed_policy(name), env.action_space)
    total, ended, frames = play_from_warmup(env, policy, seed, len(acts), acts, horizon)
    if not np.array_equal(frames[-1], last_frame):
        raise SystemExit(f"track {seed}: the replayed lead-in does not reach the recorded frame")
    env.close()
    return total, ended


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="final", help="run folder under runs/ (V, M, store)")
    ap.add_argument("--driver", required=True, help="controller checkpoint driving the lead-in")
    ap.add_argument("--mdnrnn", default="", help="M to measure (default: the run's M)")
    ap.add_argument("--name", default="lead_in", help="output folder under the run's fidelity/")
    ap.add_argument("--tracks", type=int, default=16)
    ap.add_argument("--lead-min", type=int, default=50, help="fewest lead-in steps")
    ap.add_argument("--lead-max", type=int, default=400, help="most lead-in steps")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--horizon", type=int, default=300)
    ap.add_argument("--samples", type=int, default=4, help="dreams per start")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="track set and dream seed")
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = Path("runs") / args.run
    out = run / "fidelity" / args.name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    seeds = [FIDELITY_SEED_BASE + args.seed * 10_000 + i for i in range(args.tracks)]
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.lead_min, args.lead_max + 1, size=len(seeds))
    cache = out / "real.json"  # the real side depends on the driver and tracks only
    key = [str(Path(args.driver).resolve()), seeds, lengths.tolist(), args.warmup, args.horizon]
    driver = reference_driver(run, Path(args.driver))
    leads = [lead_in(driver, s, args.warmup, int(n)) for s, n in zip(seeds, lengths)]
    names = list(FIXED_POLICIES)
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    if stored.get("key") == key:
        real, real_ended = np.array(stored["returns"]), np.array(stored["ended"])
    else:
        items = [
            (n, s, acts, frames[-1], args.horizon)
            for n in names
            for s, (frames, acts) in zip(seeds, leads)
        ]
        with ProcessPoolExecutor(2) as pool:
            played = list(pool.map(real_after, items))
        real = np.array([r for r, _ in played]).reshape(len(names), len(seeds))
        real_ended = np.array([e for _, e in played], float).reshape(len(names), len(seeds))
        atomic_write_text(
            cache,
            json.dumps({"key": key, "returns": real.tolist(), "ended": real_ended.tolist()}) + "\n",
        )

    vae, mdnrnn, _, settings = load_agent_parts(
        run / "vae/checkpoints",
        Path(args.mdnrnn) if args.mdnrnn else run / "mdnrnn/checkpoints",
        run / "store",
    )
    step = mdnrnn_step(mdnrnn, args.temperature)
    starts = []  # one per track: the lead-ins differ in length
    for frames, acts in leads:
        x = np.stack([preprocess(f, settings.size, settings.crop_bottom) for f in frames])
        with torch.no_grad():
            z = vae.encode(images_to_float(torch.from_numpy(x)))[0]  # (W + 1, z_dim) means
        starts.append(start_states_from_frames(step, [z], acts, mdnrnn.config.hidden))
    start = tuple(torch.cat(part) for part in zip(*starts))
    env = make_env(ENV_ID, 10)
    policies = [fixed_policy(n) for n in names]
    dream, dream_ended = dream_returns_for(
        step, policies, start, args.horizon, args.samples, env.action_space, args.seed
    )
    result = FidelityResult(names, dream, real, {}, dream_ended, real_ended)
    summary = {
        "name": "fidelity_lead_in",
        "run": args.run,
        "mdnrnn": args.mdnrnn or str(run / "mdnrnn/checkpoints"),
        "driver": args.driver,
        "lead_in_steps": lengths.tolist(),
        **result.summary(),
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_text(out / "fidelity.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "fidelity.md", result.markdown())
    print(result.markdown())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
