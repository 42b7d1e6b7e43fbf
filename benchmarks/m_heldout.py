"""M on real encoded CarRacing data: held-out NLL per latent dimension vs a persistence baseline.

Trains M (`--kind lstm`: the MDN-RNN, or `transformer`) through the toolkit's own `wm train-m`
code (`worldmodels.train_m.main`) on a latent
store (default: the small config's, `runs/carracing_small/latents`, made by `wm pipeline` or by
collect -> train-vae -> encode), for a fixed time budget, then scores held-out episodes:

- nll_per_dim: M's mixture NLL of z_{t+1} per latent dimension (z drawn from the posterior).
- persistence_nll_per_dim: a Gaussian centred on z_t with the per-dimension variance of
  z_{t+1} - z_t fitted on the training episodes (the "nothing moves" model).
- reward_mse vs mean_reward_mse (predicting the training mean), done accuracy on the final steps
  and on all steps, and training sequence-steps/s on this machine.

    python benchmarks/m_heldout.py [--latents DIR] [--epochs 8] [--kind lstm|transformer]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gen_core.config import from_dict
from worldmodels.latents import LatentStore
from worldmodels.layout import RunLayout
from worldmodels.models import load_m
from worldmodels.sequences import load_episodes, make_chunks
from worldmodels.train_m import TrainMConfig, split_latent_episodes
from worldmodels.train_m import main as train_m


def persistence_nll(train, held) -> float:
    """NLL per dim of N(z_t, var) for z_{t+1}, var fitted on training steps."""
    diffs = np.concatenate([(c["z_next"] - c["z"])[c["mask"].bool()].numpy() for c in [train]])
    var = diffs.var(axis=0) + 1e-8  # (z_dim,)
    m = held["mask"].bool()
    d = (held["z_next"] - held["z"])[m].numpy()
    nll = 0.5 * (d**2 / var + np.log(2 * math.pi * var))
    return float(nll.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", default="runs/carracing_small/latents")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--kind", choices=["lstm", "transformer"], default="lstm")
    args = p.parse_args()
    latents = Path(args.latents)
    if not LatentStore(latents).exists():
        raise SystemExit(
            f"{latents}: no latent store; run 'wm pipeline --config configs/carracing_small.yaml' "
            "(or collect, train-vae, encode) first"
        )
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as root:
        cfg = from_dict(
            TrainMConfig,
            {
                "runs_dir": root,
                "run_name": "bench",
                "latents": str(latents),
                "epochs": args.epochs,
                "hidden": args.hidden,
                "kind": args.kind,
                "progress": False,
                "seed": 0,
            },
        )
        t0 = time.perf_counter()
        train_m(cfg)
        train_s = time.perf_counter() - t0
        model, _ = load_m(RunLayout(Path(root) / "bench").m_checkpoints())
        store = LatentStore(latents)
        episodes = load_episodes(store, cfg.reward_target, cfg.reward_clip)
        train_eps, held_eps = split_latent_episodes(store, episodes, cfg.heldout_fraction, cfg.seed)
        rng = np.random.default_rng(123)
        train = make_chunks(train_eps, cfg.seq_len, rng, 1.0, False)
        held = make_chunks(held_eps, cfg.seq_len, rng, 1.0, False)
        with torch.no_grad():
            out = model(held["z"], held["actions"])
            terms = model.loss(out, held["z_next"], held["rewards"], held["done"], held["mask"])
        m = held["mask"].bool()
        mean_reward = train["rewards"][train["mask"].bool()].mean()
        mean_reward_mse = float(((held["rewards"][m] - mean_reward) ** 2).mean())
        done_pred = (out.done_logit > 0)[m]
        done_true = held["done"][m].bool()
        # The final step of every held-out episode: done there iff the env terminated it (a
        # time-limit truncation is not an end M should predict).
        final_hits = []
        for ep in held_eps:
            z = torch.from_numpy(ep.mu)[None]
            with torch.no_grad():
                logit = model(z[:, :-1], torch.from_numpy(ep.actions)[None]).done_logit[0, -1]
            final_hits.append(bool(logit > 0) == bool(ep.done[-1]))
        terminated_share = float(np.mean([ep.done[-1] for ep in episodes]))
    tb_steps = sum(len(ep.actions) for ep in train_eps) * args.epochs / train_s
    result = {
        "name": "m_heldout",
        "kind": args.kind,
        "nll_per_dim": round(float(terms["nll"]), 4),
        "persistence_nll_per_dim": round(persistence_nll(train, held), 4),
        "reward_mse": round(float(terms["reward_mse"]), 5),
        "mean_reward_mse": round(mean_reward_mse, 5),
        "reward_r2": round(1 - float(terms["reward_mse"]) / mean_reward_mse, 4),
        "done_acc_final_steps": round(float(np.mean(final_hits)), 4),
        "terminated_episode_share": round(terminated_share, 4),
        "done_acc_all_steps": round(float((done_pred == done_true).float().mean()), 4),
        "steps_per_s": round(tb_steps, 1),
        "epochs": args.epochs,
        "train_episodes": len(train_eps),
        "heldout_episodes": len(held_eps),
        "train_seconds": round(train_s, 1),
        "units": "NLL in nats per latent dim (lower is better); steps_per_s = training "
        "sequence-steps per second incl. data preparation, 2 cores",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
