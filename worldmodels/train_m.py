"""`wm train-m`: train M, the world model, on the latent episodes written by `wm encode`.

`kind` picks M: World Models' MDN-RNN (`lstm`, `gen_core/mdnrnn.py`) or a Transformer M
(`transformer`, `gen_core/mdn_transformer.py`: gen_core's GPT over [z, a] steps under the same
mixture, reward and end heads). Both train here on the same chunks and are saved with their
config inside the checkpoint (model.yaml), so every other stage loads either one with
`worldmodels.models.load_m` and runs it through the one-step protocol of `gen_core/mdn.py`.

Every epoch draws each step's z afresh from V's posterior (scaled by `z_noise`), cuts episodes
into chunks of `seq_len` steps (`worldmodels/sequences.py`) and trains on shuffled batches, each
chunk from an empty memory. With `free_run=k` each batch also gets a second pass whose inputs come
from windows of k steps in which M runs on its own draws, as in a dream, from a real z at each
window's start, scored against the real targets: M learns what to do once its dream drifts off
the data (on CarRacing the dreamed car then pulls away from rest as the real one does;
experiments/fidelity). Held-out episodes (V's split) give the NLL per latent dimension, the
reward MSE and the end accuracy each epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gen_core.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    model_spec,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.config import setting, to_dict
from gen_core.errors import UserError
from gen_core.mdn_transformer import MDNTransformer, MDNTransformerConfig
from gen_core.mdnrnn import MDNRNN, MDNRNNConfig
from gen_core.runs import RunConfig, progress, resolve_device, start_run
from worldmodels.episodes import split_episodes
from worldmodels.latents import LatentStore
from worldmodels.layout import RunLayout
from worldmodels.sequences import Episode, load_episodes, make_chunks, training_batches

# Settings that fix the shapes of M's weights (the Transformer's also its layers and window, made
# from seq_len): a resume must match them.
SHAPE_KEYS = ["kind", "hidden", "n_mixtures", "z_dim", "action_dim"]
TRANSFORMER_SHAPE_KEYS = ["layers", "seq_len"]
GRAD_CLIP = 1.0  # gradient norm clip
WARMUP_BATCHES = 50  # the Transformer's learning rate ramps up over its first batches
FREE_RUN_TEMPERATURE = 1.0  # free-running draws at World Models' own temperature


@dataclass
class TrainMConfig(RunConfig):
    """Settings of `wm train-m`."""

    latents: str = setting("", "latent store from 'wm encode' (default: <run_dir>/latents)")
    out_name: str = setting("m", "output folder under the run folder (one per iteration round)")
    kind: Literal["lstm", "transformer"] = setting(
        "lstm", "M's sequence model: World Models' MDN-RNN, or a causal Transformer over steps"
    )
    hidden: int = setting(
        256, "LSTM units, or the Transformer's width (heads of 32 wide, one below 32)", min=1
    )
    layers: int = setting(2, "Transformer blocks (the LSTM has one layer)", min=1)
    n_mixtures: int = setting(5, "Gaussians per latent dimension", min=1)
    reward_target: Literal["raw", "progress", "trailing"] = setting(
        "raw",
        "what the reward head learns: the raw step reward; progress, the mean of the next 20 "
        "rewards (dense, but a forecast of what the data's policy did next); or trailing, the "
        "mean of the last 20 up to this step (dense, and caused by the motion already dreamed)",
    )
    reward_clip: list[float] = setting(
        [],
        "[low, high]: clip rewards before the target is made, e.g. [-1, 100] keeps CarRacing's "
        "-100 exit (an episode end the end head predicts) out of the reward head ([]: no clip)",
    )
    seq_len: int = setting(
        100,
        "steps per training chunk (truncated BPTT); the Transformer attends over the last "
        "seq_len/2 steps, so half of each chunk sees a full window, as every later dream step does",
        min=4,
    )
    batch_size: int = setting(32, "chunks per batch", min=1)
    epochs: int = setting(20, "passes over the training episodes", min=1)
    lr: float = setting(1e-3, "Adam learning rate", min=0.0, min_inclusive=False)
    z_noise: float = setting(
        1.0,
        "scale of V's posterior std in the z M reads (1: World Models' draw; 0: V's mean)",
        min=0.0,
    )
    free_run: int = setting(
        0,
        "a second pass per batch on windows of this many steps in which M reads its own draws, "
        "from a real z at each window's start, scored against the real targets (0: off)",
        min=0,
    )
    heldout_fraction: float = setting(
        0.05, "fraction of episodes held out (V's rule)", min=0.0, max=0.5
    )

    def validate(self) -> None:
        super().validate()
        if self.reward_clip and (
            len(self.reward_clip) != 2 or self.reward_clip[0] >= self.reward_clip[1]
        ):
            raise UserError(
                f"reward_clip: expected [] or [low, high] with low < high, got {self.reward_clip}"
            )
        if self.kind == "transformer" and self.hidden > 32 and self.hidden % 32:
            raise UserError(
                f"hidden: the Transformer's width is heads of 32, so a multiple of 32 (or at "
                f"most 32), got {self.hidden}"
            )

    def latents_path(self) -> Path:
        return Path(self.latents) if self.latents else RunLayout(self.run_dir).latents


def build_m(cfg: TrainMConfig, z_dim: int, action_dim: int) -> torch.nn.Module:
    """A fresh M of `cfg.kind` for latents of z_dim and actions of action_dim."""
    if cfg.kind == "lstm":
        return MDNRNN(MDNRNNConfig(z_dim, action_dim, cfg.hidden, cfg.n_mixtures))
    return MDNTransformer(
        MDNTransformerConfig(
            z_dim=z_dim,
            action_dim=action_dim,
            n_embd=cfg.hidden,
            n_layer=cfg.layers,
            head_size=min(32, cfg.hidden),
            window=max(1, cfg.seq_len // 2),
            n_mixtures=cfg.n_mixtures,
        )
    )


def split_latent_episodes(
    store: LatentStore, episodes: list[Episode], fraction: float, seed: int
) -> tuple[list[Episode], list[Episode]]:
    """(train, held-out) with V's rule, so M holds out the same episodes V did (same seed)."""
    if fraction == 0:
        return episodes, []
    position = {index: pos for pos, index in enumerate(store.indices())}
    train, held = split_episodes(list(position), fraction, seed)
    return [episodes[position[i]] for i in train], [episodes[position[i]] for i in held]


@torch.no_grad()
def free_run_inputs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], window: int, phase: int
) -> torch.Tensor:
    """M's inputs for a free-running pass: the real z at t = 0 and wherever t = phase (mod
    window); in between, z drawn from M's prediction at the step before, through the same
    one-step protocol a dream runs. Returns z (B, T, z_dim)."""
    z_real, actions = batch["z"], batch["actions"]
    B, T, _ = z_real.shape
    m = model.stepper()  # the LSTM's is a snapshot of this batch's weights; the Transformer's
    # reads the live model (in eval mode until the pass is done)
    state = m.initial_state(B)
    steps = torch.arange(T, device=z_real.device)
    real = ((steps - phase) % window == 0) | (steps == 0)  # (T,)
    inputs, z = [], z_real[:, 0]
    for t in range(T):
        if real[t]:
            z = z_real[:, t]  # (B, z_dim)
        inputs.append(z)
        s = m.step(state, z, actions[:, t], FREE_RUN_TEMPERATURE)
        state, z = s.state, s.z  # z: (B, z_dim) drawn z_{t+1}
    model.train()  # the Transformer's stepper set eval mode
    return torch.stack(inputs, dim=1)  # (B, T, z_dim)


@torch.no_grad()
def evaluate(model, chunks: dict[str, torch.Tensor], device, batch: int = 64) -> dict:
    """Held-out NLL per latent dimension, reward MSE and end accuracy (masked means)."""
    model.eval()
    sums = {"nll": 0.0, "reward_mse": 0.0, "done_correct": 0.0, "n": 0.0}
    for i in range(0, len(chunks["z"]), batch):
        b = {k: v[i : i + batch].to(device) for k, v in chunks.items()}
        out = model(b["z"], b["actions"])
        terms = model.loss(out, b["z_next"], b["rewards"], b["done"], b["mask"])
        n = b["mask"].sum().item()
        sums["n"] += n
        sums["nll"] += terms["nll"].item() * n
        if "reward_mse" in terms:
            sums["reward_mse"] += terms["reward_mse"].item() * n
        if out.done_logit is not None:
            pred = (out.done_logit > 0).float()
            sums["done_correct"] += ((pred == b["done"]).float() * b["mask"]).sum().item()
    model.train()
    n = max(sums["n"], 1.0)
    return {
        "nll": sums["nll"] / n,
        "reward_mse": sums["reward_mse"] / n,
        "done_acc": sums["done_correct"] / n,
    }


def main(cfg: TrainMConfig) -> int:
    run = start_run(cfg, "m", folder=cfg.out_name)
    device = resolve_device(cfg.device)
    store = LatentStore(cfg.latents_path())
    episodes = load_episodes(store, cfg.reward_target, cfg.reward_clip)
    if not episodes:
        raise UserError(f"{store.path}: no encoded episodes; run 'wm encode' first")
    z_dim, action_dim = episodes[0].mu.shape[1], episodes[0].actions.shape[1]
    train_eps, held_eps = split_latent_episodes(store, episodes, cfg.heldout_fraction, cfg.seed)

    model = build_m(cfg, z_dim, action_dim).to(device)
    if cfg.kind == "lstm":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:  # GPT's recipe: AdamW, decay on matrices only, beta2 0.95, a short warm-up
        opt = model.core.configure_optimizer(0.01, cfg.lr, (0.9, 0.95))
        opt.add_param_group({"params": list(model.heads.parameters()), "weight_decay": 0.0})
    ckpt_dir = run.dir / "checkpoints"
    config = to_dict(cfg) | {"z_dim": z_dim, "action_dim": action_dim}
    start_epoch = 0
    if latest_checkpoint(ckpt_dir) is not None:
        ck = load_checkpoint(ckpt_dir, map_location=device)
        keys = SHAPE_KEYS + (TRANSFORMER_SHAPE_KEYS if cfg.kind == "transformer" else [])
        check_compatible(ck.config, config, keys, ck.path)
        model.load_state_dict(ck.model)
        opt.load_state_dict(ck.state["optim"])
        set_rng_state(ck.state["rng"])
        start_epoch = ck.step
        run.log.info(f"m: resumed from {ck.path} (epoch {start_epoch})")
    data_rng = np.random.default_rng([cfg.seed, start_epoch])
    held = (
        make_chunks(held_eps, cfg.seq_len, np.random.default_rng(cfg.seed), cfg.z_noise, False)
        if held_eps
        else None
    )
    run.log.info(
        f"m: {cfg.kind}, {len(train_eps)} train / {len(held_eps)} held-out episodes, z_dim "
        f"{z_dim}, {sum(p.numel() for p in model.parameters())} parameters, device {device}"
    )

    for epoch in range(start_epoch, cfg.epochs):
        batches = training_batches(train_eps, cfg.seq_len, cfg.batch_size, cfg.z_noise, data_rng)
        bar = progress(
            batches, desc=f"m {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False
        )
        t0, steps, total = time.perf_counter(), 0.0, 0.0
        for i, batch in enumerate(bar):
            batch = {k: v.to(device) for k, v in batch.items()}
            if cfg.kind == "transformer":
                ramp = min(1.0, (epoch * len(batches) + i + 1) / WARMUP_BATCHES)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * ramp
            out = model(batch["z"], batch["actions"])
            terms = model.loss(out, batch["z_next"], batch["rewards"], batch["done"], batch["mask"])
            if cfg.free_run:
                # A random phase per batch, so every step is sometimes a window's start.
                phase = int(torch.randint(cfg.free_run, ()))
                z_in = free_run_inputs(model, batch, cfg.free_run, phase)
                free = model.loss(
                    model(z_in, batch["actions"]),
                    batch["z_next"],
                    batch["rewards"],
                    batch["done"],
                    batch["mask"],
                )
                terms = terms | {"loss": (terms["loss"] + free["loss"]) / 2}
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            steps += batch["mask"].sum().item()
            total += terms["loss"].item()
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
        bar.close()
        elapsed = time.perf_counter() - t0
        metrics = evaluate(model, held, device) if held_eps else {}
        run.scalars(
            epoch + 1,
            train_loss=total / len(batches),
            steps_per_s=steps / elapsed,
            **{f"heldout_{k}": v for k, v in metrics.items()},
        )
        run.log.info(
            f"m epoch {epoch + 1}/{cfg.epochs}: train loss {total / len(batches):.4f}"
            + "".join(f", held-out {k} {v:.4f}" for k, v in metrics.items())
            + f", {steps / elapsed:.0f} seq-steps/s"
        )
        save_checkpoint(
            ckpt_dir,
            epoch + 1,
            model.state_dict(),
            {"optim": opt.state_dict(), "rng": rng_state(), "metrics": metrics},
            config,
            model_spec=model_spec(model),
        )
        data_rng = np.random.default_rng([cfg.seed, epoch + 1])
    run.close()
    return 0
