"""Benchmark: VAE, DCGAN, WGAN-GP, DDPM and latent DDPM on CarRacing frames, equal CPU budgets.

    python benchmarks/image_gen.py [--store PATH] [--budget-s 80] [--image-size 64] [--n 300]

Collects a small CarRacing store with the toolkit's `wm collect` code (inline backend, no Ray)
into a temporary folder, unless `--store` names one. Then each model trains through
`wm gen train-image`'s `main` for `--budget-s` seconds of training (time_budget_s; the same
wall-clock budget each, so each model gets as many steps as its cost allows), and is judged
like `wm gen eval` judges it, all with one feature net trained once on the store's training
episodes:

* fd: Fréchet distance between `--n` samples and `--n` held-out real frames in the feature
  net's standardised space (gen_core/image_metrics.py); fd_train: the same against `--n`
  training frames, FID's usual reference set (copying is what makes it unsafe, and nn_ratio
  checks that). A quarter of the episodes are held out (--held-out) so that the held-out set
  spans several tracks. References, computed the same way with the same n: *_real_ref (n
  other real training frames in place of the samples: where a perfect model would score),
  *_mean_frame_ref (n copies of the mean training frame), *_noise_ref (uniform noise).
* nn_ratio: median distance of a sample to its nearest training frame / the same for held-out
  frames (about 1 or more: no copying; far below 1: copies).
* samples_per_s: images generated per second (DDPM: DDIM with --ddim-steps steps and --eta;
  eta = 1 by default because a DDPM trained for a few hundred steps predicts the noise too
  roughly for the deterministic eta = 0 sampler, which keeps whatever part of x_T the model
  failed to explain as leftover noise in the image; fresh noise at each step washes it out).
* train_images_per_s: real images consumed per second of training (WGAN-GP takes n_critic = 5
  batches per generator step; latent DDPM: codes per second).
* fd_train_over_floor: fd_train / fd_train_real_ref, how far a model is from real frames.

The latent DDPM works in the VAE trained just before it in the same run (its `vae=`), and
trains for its own `--budget-s` on top (`v_train_s` says how long V took). Pixel DDPM runs with
`--ddpm` settings (default: a smaller U-Net, cosine schedule, v-prediction, min-SNR weighting,
EMA decay 0.999, batches of 16 at lr 2e-3: twice the steps in the budget; at 80 s they took
fd_train from 97.6 to 71.3, docs/results/image_gen), latent DDPM with `--latent`; pass other
`key=value` lists to compare. The U-Net: width 16 with mults 1, 2, 4, 4 takes about 1.3 s per
64x64 batch of 32 on 2 loaded cores, against 2.8 s for width 32 with mults 1, 2, 2, 2 (1.1M
and 1.5M parameters).

Defaults are sized for 2 CPU cores in about 10 minutes: 64x64 frames, widths of 32, 80 s each.
The last line printed is one JSON object. Timings on a shared machine are noisy: other jobs
running at the same time slow any figure down, and every model's figure in one run is affected
alike only if the load stays the same.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with other jobs,
# spinning threads of two processes starve each other and a step can take 10-30x longer
# (measured here: the VAE's step went from 0.93 s to 0.034 s). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gen_core.config import from_dict, load_config  # noqa: E402
from worldmodels.gen.image import (  # noqa: E402
    ImageData,
    TrainImageConfig,
    generate,
    image_scores,
    load_image_model,
    load_or_train_features,
    main,
    sampler_name,
)

MODELS = ("vae", "dcgan", "wgan-gp", "ddpm", "latent-ddpm")


def collect_store(root: Path, episodes: int, steps: int) -> Path:
    from rollouts.collect import CollectConfig
    from rollouts.recording import collect

    cfg = from_dict(
        CollectConfig,
        {"runs_dir": str(root), "run_name": "data", "episodes": episodes, "max_steps": steps,
         "backend": "inline", "progress": False, "seed": 0},
    )  # fmt: skip
    collect(cfg)
    return cfg.store_path()


def train(model: str, store: Path, runs: Path, args, vae: str = "") -> dict:
    overrides = [
        f"model={model}", f"data={store}", f"runs_dir={runs}", "run_name=bench",
        f"image_size={args.image_size}", f"batch_size={args.batch_size}",
        f"held_out={args.held_out}", "steps=1000000", f"time_budget_s={args.budget_s}",
        "progress=false", "log_every=25", "sample_every=1000000", "checkpoint_every=1000000",
        "grid_n=16",
        f"ddim_steps={args.ddim_steps}", f"eta={args.eta}", f"threads={args.threads}",
    ]  # fmt: skip
    if model != "latent-ddpm":
        overrides.append(f"width={args.width}")
    if model == "ddpm":
        overrides += args.ddpm.split()
    if model == "latent-ddpm":
        overrides += [f"vae={vae}", *args.latent.split()]
    return main(load_config(TrainImageConfig, overrides=overrides))


def main_benchmark(args) -> dict:
    wall0 = time.perf_counter()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="image_gen_bench_") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        t0 = time.perf_counter()
        store = Path(args.store) if args.store else collect_store(root, args.episodes, args.steps)
        collect_s = time.perf_counter() - t0
        data = ImageData(store, args.image_size, held_out=args.held_out)
        held = data.load("held_out", limit=args.n, seed=0)
        train_frames = data.load("train", limit=20000, seed=0)
        n = len(held)
        t0 = time.perf_counter()
        net, features = load_or_train_features(
            root / "features", data, args.feature_steps, torch.device("cpu")
        )
        features_s = time.perf_counter() - t0

        counts = {"train_frames": data.count("train"), "held_out_frames": data.count("held_out")}
        results, refs, vae = {}, {}, ""
        for model in args.models.split(","):
            if model == "latent-ddpm" and not vae:
                raise SystemExit("latent-ddpm needs the vae run before it (--models vae,...)")
            summary = train(model, store, root / "runs", args, vae)
            if model == "vae":
                vae, v_train_s = summary["checkpoint"], summary["train_seconds"]
            kind, gen_model, ckpt = load_image_model(summary["checkpoint"], "cpu")
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(0)
            samples = generate(kind, gen_model, n, gen, ddim_steps=args.ddim_steps, eta=args.eta)
            sample_s = time.perf_counter() - t0
            scores = image_scores(net, samples, held, train_frames, seed=0)
            refs = {k: scores.pop(k) for k in list(scores) if k.endswith("_ref")}
            results[model] = {
                "fd": round(scores["fd"], 3),
                "fd_train": round(scores["fd_train"], 3),
                "fd_train_over_floor": round(scores["fd_train"] / refs["fd_train_real_ref"], 2),
                "nn_ratio": round(scores["nn_ratio"], 3),
                "samples_per_s": round(n / sample_s, 1),
                "train_images_per_s": round(summary["train_images_per_s"], 1),
                "train_steps": summary["step"],
                "train_s": round(summary["train_seconds"], 1),
                "last_losses": {k: round(v, 4) for k, v in summary["figures"].items()},
                "frac_samples_closer_than_any_held_out": round(
                    scores["frac_samples_closer_than_any_held_out"], 3
                ),
                "sampler": sampler_name(kind, "ddim", args.ddim_steps, args.eta),
            }
            if model == "latent-ddpm":
                results[model]["v_train_s"] = round(v_train_s, 1)
            if args.keep:
                results[model]["grid"] = summary["last_grid"]
            print(f"{model}: {json.dumps(results[model])}", file=sys.stderr)

    print(
        "\nmodel        fd       fd_train  nn_ratio  samples/s  train img/s  steps", file=sys.stderr
    )
    for model, r in results.items():
        print(
            f"{model:<12} {r['fd']:<8.2f} {r['fd_train']:<9.2f} {r['nn_ratio']:<9.3f} "
            f"{r['samples_per_s']:<10.1f} {r['train_images_per_s']:<12.1f} {r['train_steps']}",
            file=sys.stderr,
        )
    print(
        "references (same n): " + ", ".join(f"{k} {v:.3f}" for k, v in refs.items()),
        file=sys.stderr,
    )
    return {
        "name": "image_gen",
        "models": results,
        "fd_reference": {k: round(v, 3) for k, v in refs.items()},
        "budget_s_per_model": args.budget_s,
        "ddpm_settings": args.ddpm,
        "latent_ddpm_settings": args.latent,
        "image_size": args.image_size,
        "width": args.width,
        "batch_size": args.batch_size,
        "n": n,
        "data": {
            "store": str(store)
            if args.store
            else f"collected: {args.episodes} episodes x "
            f"{args.steps} steps, CarRacingFast-v3, correlated policy, seed 0",
            **counts,
            "collect_s": round(collect_s, 1),
        },
        "features": {
            "net": "FeatureNet autoencoder trained on the training episodes (image_metrics.py)",
            "steps": args.feature_steps,
            "train_s": round(features_s, 1),
        },
        "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "units": {
            "fd": "Fréchet distance in standardised FeatureNet space, n samples vs n held-out "
            "frames",
            "fd_train": "the same against n training frames (FID's usual reference set)",
            "fd_reference": "*_real_ref: n other training frames in place of the samples (the "
            "floor at this n); *_mean_frame_ref: n copies of the mean training frame; "
            "*_noise_ref: uniform noise; fd_train_*: against training frames",
            "nn_ratio": "median nearest-training-frame L2 (pixels in [0, 1]) of samples / of "
            "held-out frames",
            "samples_per_s": "images/s, batch 100",
            "train_images_per_s": "real images/s over training steps only",
            "budget_s_per_model": "seconds of training per model (time_budget_s)",
        },
        "note": "2 CPU cores; timings depend on whatever else runs on the machine",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="use this rollout store instead of collecting one")
    p.add_argument("--episodes", type=int, default=24, help="episodes to collect")
    p.add_argument("--steps", type=int, default=200, help="steps per collected episode")
    p.add_argument("--held-out", type=float, default=0.25, help="fraction of the episodes held out")
    p.add_argument("--budget-s", type=float, default=80.0, help="training seconds per model")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, in order")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="channel width of every model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n", type=int, default=300, help="samples and held-out frames compared")
    p.add_argument("--ddim-steps", type=int, default=20)
    p.add_argument(
        "--eta", type=float, default=1.0, help="DDIM eta (1: stochastic; see the module doc)"
    )
    p.add_argument(
        "--ddpm",
        default="width=16 ddpm_mults=[1,2,4,4] ddpm_attention=[8] schedule=cosine prediction=v "
        "weighting=min-snr ema_decay=0.999 batch_size=16 lr=2e-3",
        help="train-image settings of the pixel DDPM (space-separated key=value)",
    )
    p.add_argument(
        "--latent",
        default="width=512 depth=4 batch_size=256 schedule=cosine ema_decay=0.999",
        help="train-image settings of the latent DDPM (space-separated key=value)",
    )
    p.add_argument("--feature-steps", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--keep", help="write runs and features here instead of a temporary folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(main_benchmark(parse_args())))
