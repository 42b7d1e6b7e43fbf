"""How fast the dreamed car goes: the measurement behind "Speed in the dream" (README.md here).

A ridge read-out of CarRacing's true speed (the hull's velocity) from V's mean, fitted on real
frames, applied to dreamed latents. Same tracks, warm-up and starts as `wm fidelity`.

    python docs/results/fidelity/speed_probe.py --run const --mdnrnn mdnrnn_L500 [--tau 1.0]

Prints, per policy, the mean speed at a few steps for: the real car; M's dreams (4 per start);
M one step ahead on the real frames (teacher forced); and dreams that start after k real steps
of the policy (k = 10, 25, 50). Uses only the read-out's informative dimensions (those of V's
mean with std > 0.3 over the frames): the rest hold V's posterior noise, which a dream draws.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from gen_core.vae import images_to_float
from rollouts.collect import make_env, preprocess
from worldmodels.agent import load_agent_parts
from worldmodels.fidelity import (
    FIDELITY_SEED_BASE,
    dream_policy,
    fixed_policy,
    mdnrnn_step,
    real_policy,
)

WARMUP, HORIZON, TRACKS, DREAMS = 50, 300, 8, 4
POLICIES = ["stop", "gas_0.2", "gas_0.5", "full_gas"]
SHOWN = [25, 50, 100, 150, 200, 250, 299]  # steps after the warm-up


def real_runs(env, encode, seeds):
    """{(policy, seed): (latents (W + 1 + steps, z), speeds (W + 1 + steps,))}."""
    runs = {}
    for name in POLICIES:
        for seed in seeds:
            policy = real_policy(fixed_policy(name), env.action_space)
            obs, _ = env.reset(seed=seed)
            frames, speeds = [obs], [0.0]
            for t in range(WARMUP + HORIZON):
                action = policy(obs) if t >= WARMUP else np.zeros(3, np.float32)
                obs, _, terminated, truncated, _ = env.step(action)
                frames.append(obs)
                speeds.append(float(np.linalg.norm(env.unwrapped.car.hull.linearVelocity)))
                if terminated or truncated:
                    break
            runs[name, seed] = (encode(frames), np.array(speeds))
    return runs


def fit_readout(runs):
    """(informative-dimension mask, ridge weights with bias), and the fit's R^2."""
    x = np.concatenate([z.numpy() for z, _ in runs.values()])
    y = np.concatenate([s for _, s in runs.values()])
    keep = x.std(0) > 0.3
    xa = np.c_[x[:, keep], np.ones(len(x))]
    w = np.linalg.solve(xa.T @ xa + 1e-2 * np.eye(xa.shape[1]), xa.T @ y)
    r2 = 1 - ((xa @ w - y) ** 2).mean() / y.var()
    return keep, w, r2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder under runs/ (its vae and store)")
    ap.add_argument("--mdnrnn", required=True, help="M's folder in that run")
    ap.add_argument("--tau", type=float, default=1.0, help="dream temperature")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", "Mean of empty slice")  # steps every dream ended by
    torch.set_num_threads(2)
    root = f"runs/{args.run}"
    vae, model, _, frames = load_agent_parts(
        f"{root}/vae/checkpoints", f"{root}/{args.mdnrnn}/checkpoints", f"{root}/store"
    )
    env = make_env("CarRacingFast-v3", WARMUP + HORIZON + 1)

    def encode(obs):
        x = np.stack([preprocess(o, frames.size, frames.crop_bottom) for o in obs])
        with torch.no_grad():
            return vae.encode(images_to_float(torch.from_numpy(x)))[0]  # (N, z_dim)

    seeds = [FIDELITY_SEED_BASE + i for i in range(TRACKS)]
    runs = real_runs(env, encode, seeds)
    keep, w, r2 = fit_readout(runs)
    speed = lambda z: np.c_[z.numpy()[..., keep], np.ones(z.shape[:-1])] @ w  # noqa: E731
    print(f"read-out: {keep.sum()} dimensions, R^2 {r2:.3f}; steps {SHOWN}")
    step, zero_tau = mdnrnn_step(model, args.tau), mdnrnn_step(model, 0.0)
    for name in POLICIES:
        real = np.full((TRACKS, HORIZON), np.nan)
        for i, seed in enumerate(seeds):
            s = runs[name, seed][1][WARMUP + 1 :]
            real[i, : len(s)] = s
        print(f"{name:9s} real      ", np.round(np.nanmean(real, 0)[SHOWN], 1))
        action = torch.tensor(fixed_policy(name).action, dtype=torch.float32)
        # One teacher-forced pass over the real frames: M's state after each step (where the
        # dreams start) and its prediction one step ahead at temperature 0 ("forced").
        n = min(len(runs[name, seed][0]) for seed in seeds) - 1
        z_all = torch.stack([runs[name, seed][0][: n + 1] for seed in seeds])  # (N, n + 1, z)
        h = torch.zeros(TRACKS, model.config.hidden)
        c, states, forced = torch.zeros_like(h), [], []
        for t in range(n):
            states.append((h, c))
            a = action if t >= WARMUP else torch.zeros(3)
            s = zero_tau(z_all[:, t], h, c, a.expand(TRACKS, -1), None)
            h, c = s.h, s.c
            forced.append(speed(s.z).mean())
        states.append((h, c))
        for k in (0, 10, 25, 50):  # dreams that start after k real steps of the policy
            if n < WARMUP + k:
                continue
            z = z_all[:, WARMUP + k].repeat_interleave(DREAMS, 0)
            h, c = (x.repeat_interleave(DREAMS, 0) for x in states[WARMUP + k])
            g = torch.Generator().manual_seed(0)
            act = dream_policy(fixed_policy(name), len(z), env.action_space, g, list(range(len(z))))
            alive = torch.ones(len(z), dtype=torch.bool)
            dreamed = np.full((len(z), HORIZON), np.nan)
            for t in range(k, HORIZON):
                s = step(z, h, c, act(z, h), g)
                z, h, c = s.z, s.h, s.c
                dreamed[alive.numpy(), t] = speed(z)[alive.numpy()]
                alive &= ~s.done
            print(f"{name:9s} dream k={k:<2d}", np.round(np.nanmean(dreamed, 0)[SHOWN], 1))
        tf = np.r_[forced[WARMUP:], np.full(HORIZON, np.nan)][:HORIZON]
        print(f"{name:9s} forced    ", np.round(tf[SHOWN], 1))


if __name__ == "__main__":
    main()
