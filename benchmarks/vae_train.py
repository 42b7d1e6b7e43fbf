"""Benchmark V: the toolkit's VAE training speed on CPU, and what a small budget buys.

1. Collects a small CarRacing store with the toolkit (`wm collect`, inline backend) in a temp dir.
2. Training throughput, frames/s: the toolkit's step (gen_core.vae.VAE, channels_last, bf16
   autocast where the CPU has native bf16, fused Adam) against a plain eager PyTorch version of
   the same World Models network (nn.Sequential, float32, NCHW, default Adam), on the same batch
   of real frames. The two alternate in short rounds so that load from other processes hits both
   alike. On a shared machine every round is slowed by whatever else runs then, so the reported
   fps are each variant's fastest round (the least disturbed) and `ratio` their quotient; the
   median of per-round ratios is reported beside it.
3. Quality: `wm train-vae` itself (the real stage: loader thread, evaluation, checkpoints) for a
   fixed number of steps, then the held-out reconstruction MSE per pixel next to the MSE of
   predicting the training set's mean frame for the same held-out frames.

    python benchmarks/vae_train.py                 # about 3 minutes on 2 idle cores
    python benchmarks/vae_train.py --compare-fp32  # also train in fp32: is bf16 exact enough?
    python benchmarks/vae_train.py --compile       # also time a torch.compile'd toolkit step

The last printed line is one JSON object (fps in frames/s, MSE per pixel channel in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless CarRacing

from gen_core.checkpoint import load_checkpoint
from gen_core.runs import resolve_device, set_threads
from gen_core.vae import VAE, VAEConfig, images_to_float
from rollouts.collect import CollectConfig
from rollouts.collect import main as collect_main
from rollouts.store import EpisodeStore
from worldmodels.episodes import split_episodes
from worldmodels.train_vae import TrainVAEConfig, heldout_frames, use_bf16
from worldmodels.train_vae import main as train_main


class PlainVAE(nn.Module):
    """The World Models VAE as one would first write it: nn.Sequential, float32, NCHW."""

    def __init__(self, z_dim: int = 32, kl_floor: float = 16.0):
        super().__init__()
        self.kl_floor = kl_floor
        self.enc = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2),
            nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2),
            nn.ReLU(),
            nn.Conv2d(128, 256, 4, 2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.mu, self.logvar = nn.Linear(1024, z_dim), nn.Linear(1024, z_dim)
        self.fc = nn.Linear(z_dim, 1024)
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, 5, 2),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, 2),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, 2),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 6, 2),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = self.dec(self.fc(z).view(-1, 1024, 1, 1))
        rec = (x - recon).pow(2).sum((1, 2, 3)).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).clamp(min=self.kl_floor)
        return rec + kl.mean()


def plain_step(frames: torch.Tensor):
    model = PlainVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = frames.permute(0, 3, 1, 2).float().div(255).contiguous()

    def step() -> None:
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def toolkit_step(frames: torch.Tensor, bf16: bool, compile: bool = False):
    """The same step as `wm train-vae` does (see worldmodels.train_vae.main)."""
    model = VAE(VAEConfig()).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    if compile:
        model.compile()

    def step() -> None:
        x = images_to_float(frames)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def throughput(steps: dict, batch: int, rounds: int, per_round: int) -> dict:
    """Frames/s of each step function in each of `rounds` interleaved rounds (wall and CPU)."""
    for step in steps.values():  # warm-up: oneDNN picks and JIT-compiles its kernels
        step()
        step()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                step()
            wall[name].append(per_round * batch / (time.perf_counter() - t))
            cpu[name].append(per_round * batch / (time.process_time() - c))
    return {"wall": wall, "cpu": cpu}


def mean_frame_mse(store: EpisodeStore, train: list[int], heldout: np.ndarray) -> float:
    """MSE per pixel of predicting every held-out frame by the training set's mean frame."""
    total, count = np.zeros(heldout.shape[1:], np.float64), 0
    for _, ep in store.iter_episodes(("obs",), indices=train):
        total += ep["obs"].sum(0, dtype=np.float64)
        count += len(ep["obs"])
    mean = total / count / 255.0
    return float(np.mean((heldout / 255.0 - mean) ** 2))


def train_run(root: Path, store: Path, args, epochs: int, precision: str) -> tuple[float, float]:
    """(held-out MSE, wall seconds) of `wm train-vae` trained for `epochs` epochs."""
    cfg = TrainVAEConfig(
        runs_dir=str(root),
        run_name=f"train_{precision}",
        store=str(store),
        seed=args.seed,
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        precision=precision,
        heldout_fraction=0.1,
        heldout_frames=1000,
        progress=False,
        keep_checkpoints=1,
        threads=args.threads,
    )
    t = time.perf_counter()
    train_main(cfg)
    wall = time.perf_counter() - t
    ckpt = load_checkpoint(root / cfg.run_name / "vae" / "checkpoints")
    return float(ckpt.state["heldout_mse"]), wall


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--episodes", type=int, default=30, help="episodes collected")
    p.add_argument("--max-steps", type=int, default=250, help="steps per episode")
    p.add_argument("--env-id", default="CarRacingFast-v3")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10, help="interleaved throughput rounds")
    p.add_argument("--per-round", type=int, default=2, help="steps of each variant per round")
    p.add_argument("--steps", type=int, default=600, help="training budget in optimiser steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--compare-fp32", action="store_true", help="also train in fp32, same budget")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd step")
    args = p.parse_args()

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vae_bench_") as tmp:
        root = Path(tmp)
        # 1. data, collected with the toolkit
        t = time.perf_counter()
        collect_main(
            CollectConfig(
                runs_dir=str(root),
                run_name="data",
                env_id=args.env_id,
                episodes=args.episodes,
                max_steps=args.max_steps,
                backend="inline",
                progress=False,
                seed=args.seed,
            )
        )
        collect_s = time.perf_counter() - t
        store = EpisodeStore(root / "data" / "store")
        train_eps, held_eps = split_episodes(store.indices(), 0.1, args.seed)

        # 2. throughput on one batch of real frames
        set_threads(args.threads)
        torch.manual_seed(args.seed)
        batch = next(store.iter_frames(args.batch_size, indices=train_eps, seed=1))
        frames = torch.from_numpy(batch)
        bf16 = use_bf16("auto", resolve_device("cpu"))
        steps = {"toolkit": toolkit_step(frames, bf16), "plain": plain_step(frames)}
        if args.compile:
            steps["compiled"] = toolkit_step(frames, bf16, compile=True)
        speed = throughput(steps, args.batch_size, args.rounds, args.per_round)
        wall, cpu = speed["wall"], speed["cpu"]
        fps = {k: max(v) for k, v in wall.items()}
        ratio = fps["toolkit"] / fps["plain"]
        ratio_median = statistics.median(a / b for a, b in zip(wall["toolkit"], wall["plain"]))
        cpu_ratio = max(cpu["toolkit"]) / max(cpu["plain"])
        for name in steps:
            print(
                f"{name:>9}: {fps[name]:6.0f} frames/s (rounds: "
                f"{', '.join(f'{v:.0f}' for v in wall[name])})"
            )
        print(
            f"ratio toolkit/plain: {ratio:.2f}x (best rounds), {ratio_median:.2f}x (median of "
            f"rounds), {cpu_ratio:.2f}x per CPU second "
            f"({'bf16' if bf16 else 'fp32'}, batch {args.batch_size}, "
            f"{torch.get_num_threads()} threads)"
        )

        # 3. quality after a fixed budget, through the real stage
        n_train = sum(store.length(i) + 1 for i in train_eps)
        epochs = max(1, round(args.steps / (n_train // args.batch_size)))
        n_steps = epochs * (n_train // args.batch_size)
        mse, train_s = train_run(root, store.path, args, epochs, "auto")
        held = heldout_frames(store, held_eps, 1000)
        baseline = mean_frame_mse(store, train_eps, held)
        print(
            f"wm train-vae: {n_steps} steps of {args.batch_size} in {train_s:.0f} s: held-out "
            f"MSE/px {mse:.5f} vs mean frame {baseline:.5f} ({baseline / mse:.1f}x lower)"
        )
        result = {
            "name": "vae_train",
            "fps": round(fps["toolkit"], 1),
            "baseline_fps": round(fps["plain"], 1),
            "ratio": round(ratio, 3),
            "ratio_median": round(ratio_median, 3),
            "cpu_ratio": round(cpu_ratio, 3),
            "fps_unit": "training frames/s (forward, backward, Adam step)",
            "precision": "bf16" if bf16 else "fp32",
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "heldout_mse": round(mse, 6),
            "mean_frame_mse": round(baseline, 6),
            "mse_unit": "mean squared error per pixel channel, pixels in [0, 1]",
            "train_steps": n_steps,
            "train_s": round(train_s, 1),
            "train_frames": n_train,
            "heldout_frames": len(held),
            "collect_s": round(collect_s, 1),
        }
        if args.compile:
            result["compiled_fps"] = round(fps["compiled"], 1)
        if args.compare_fp32:
            mse32, train32_s = train_run(root, store.path, args, epochs, "fp32")
            print(f"same budget in fp32: held-out MSE/px {mse32:.5f} in {train32_s:.0f} s")
            result["heldout_mse_fp32"] = round(mse32, 6)
            result["train_s_fp32"] = round(train32_s, 1)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
