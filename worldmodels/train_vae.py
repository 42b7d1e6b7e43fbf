"""`wm train-vae`: the vision model V of World Models, trained on the rollout store.

It trains `gen_core.vae.VAE` on the frames of an episode store: random frames drawn across
episodes through a bounded shuffle buffer, decoded by a background thread so the model never
waits for data, with whole episodes held out for evaluation (`worldmodels.episodes`: the same
rule M uses). After every epoch it writes a checkpoint (model, model.yaml, optimiser, RNG, epoch)
to `<run>/vae/checkpoints`, a PNG of held-out frames above their reconstructions and a PNG of
samples from the prior; run it again to resume. `wm encode` then turns every episode into latents.

Speed on 2 CPU cores (AMD Zen 4 with AVX512-BF16; benchmarks/vae_train.py), batch 100. A plain
eager version of the same network (nn.Sequential, fp32, NCHW, default Adam) costs 3.9 ms of CPU
per training frame on one thread; this stage's step costs 2.2-2.3 ms (1.7-1.9x: 278 against 148
frames/s on one thread of a loaded machine). Two threads scale it less well than the plain
version: 680-800 against 445-490 frames/s on two cores (1.5-1.65x). What it is made of:
- bf16 autocast, the big win (3.3 -> 2.3 ms): oneDNN runs the convs on the CPU's bf16 dot-product
  units. Weights, optimiser state and the loss stay float32. Cost in quality: after the same 630
  steps, held-out MSE/px 0.00334 against 0.00319 in fp32 (5% worse per step, for 1.4x the steps
  per second). Used where the CPU has native bf16 (`precision: auto`); elsewhere emulated bf16
  would be slower than fp32, so auto picks fp32 there.
- The decoder's first transposed conv (on a 1x1 map) runs as a matmul: same result, 4x faster
  for that layer, which was the slowest in the plain version (3.9 -> 3.3 ms with channels_last).
- channels_last: stored uint8 frames (B, H, W, 3) become channels_last float tensors with no copy,
  and oneDNN skips its layout reorders; a few percent.
- fused Adam: a few percent at 2 threads, nothing at 1.
- batch 100 (World Models'): per-frame cost is within 5% of batch 200, and gives twice the steps.
- Tried, not kept: torch.compile (2% faster: the convs, which inductor hands to oneDNN too, are
  nearly all the time; not worth 30-60 s of compiling); the last transposed conv as a sub-pixel
  conv + pixel_shuffle (exact, 4% faster overall, not worth the less obvious code).
- Threads: two threads are 1.8x one on idle cores, but when another busy process shares the two
  cores OpenMP's lock-step threads stall (we saw 15-80 frames/s); `threads=1` then runs steadily at
  ~400 frames/s.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
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
from gen_core.config import ConfigError, setting, to_dict
from gen_core.errors import UserError
from gen_core.io import atomic_write_bytes
from gen_core.runs import RunConfig, progress, resolve_device, start_run
from gen_core.vae import VAE, VAEConfig, images_to_float, images_to_uint8
from rollouts.store import EpisodeStore, open_store
from worldmodels.episodes import prefetch, split_episodes
from worldmodels.layout import RunLayout

# VAEConfig fields that fix the shapes of the weights: a checkpoint must match them to resume.
SHAPE_KEYS = ["image_size", "channels", "z_dim", "widths"]


@dataclass
class TrainVAEConfig(RunConfig):
    """Settings of `wm train-vae`."""

    store: str = setting(
        "", "episode store to train on, or minari:<dataset id> (default: <run_dir>/store)"
    )
    epochs: int = setting(10, "passes over the training frames, counting resumed ones", min=1)
    batch_size: int = setting(100, "frames per optimiser step", min=1)
    lr: float = setting(1e-3, "Adam learning rate", min=0.0, min_inclusive=False)
    z_dim: int = setting(32, "size of the latent vector z", min=1)
    widths: list[int] = setting(
        [32, 64, 128, 256], "encoder conv channels; the decoder mirrors them"
    )
    kl_tolerance: float = setting(
        0.5, "KL floor in nats per latent dimension (World Models: 0.5; 0: plain VAE)", min=0.0
    )
    bottom_rows: int = setting(
        0, "rows at the frame's bottom whose error counts bottom_weight times (0: none)", min=0
    )
    bottom_weight: float = setting(
        1.0,
        "weight of those rows: CarRacing's status bar (8 rows at 64x64) shows the speed in a "
        "2-pixel bar that a plain loss all but ignores",
        min=0.0,
    )
    heldout_fraction: float = setting(
        0.05,
        "share of episodes held out for evaluation (at least one)",
        min=0.0,
        max=0.5,
        min_inclusive=False,
    )
    heldout_frames: int = setting(2000, "held-out frames scored after each epoch, at most", min=1)
    max_frames_per_epoch: int | None = setting(
        None, "cap on training frames per epoch (default: every training frame)", min=1
    )
    shuffle_episodes: int = setting(
        16, "episodes whose frames are mixed in the shuffle buffer (~12 KB per 64x64 frame)", min=1
    )
    prefetch_batches: int = setting(8, "batches the loader thread prepares ahead", min=1)
    precision: Literal["auto", "bf16", "fp32"] = setting(
        "auto", "autocast dtype of the convs: auto is bf16 where the device runs it natively"
    )
    grid_frames: int = setting(8, "held-out frames (and prior samples per row) in the PNGs", min=1)
    keep_checkpoints: int = setting(3, "checkpoints kept (0: all)", min=0)
    log_every: int = setting(50, "steps between TensorBoard train-loss scalars", min=1)

    def validate(self) -> None:
        super().validate()
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(
                f"widths: expected a non-empty list of positive integers, got {self.widths}"
            )


# ----------------------------------------------------------------------------------------------
# helpers


def train_batches(
    store: EpisodeStore, episodes: list[int], cfg: TrainVAEConfig, epoch: int
) -> Iterator[torch.Tensor]:
    """Shuffled uint8 (B, H, W, 3) batches of one epoch, a fresh order per (seed, epoch)."""
    limit = cfg.max_frames_per_epoch or math.inf
    seen = 0
    frames = store.iter_frames(
        cfg.batch_size,
        indices=episodes,
        shuffle=True,
        seed=cfg.seed * 100_003 + epoch,
        buffer_episodes=cfg.shuffle_episodes,
        drop_last=True,
    )
    for batch in frames:
        if seen + len(batch) > limit:
            return
        seen += len(batch)
        yield torch.from_numpy(np.ascontiguousarray(batch))


def heldout_frames(store: EpisodeStore, episodes: list[int], n: int) -> np.ndarray:
    """Up to `n` frames spread evenly over the held-out episodes, read one episode at a time."""
    per_episode = math.ceil(n / len(episodes))
    picked = []
    for _, ep in store.iter_episodes(("obs",), indices=episodes):
        obs = ep["obs"]
        take = np.linspace(0, len(obs) - 1, min(per_episode, len(obs))).round().astype(int)
        picked.append(obs[np.unique(take)])
    frames = np.concatenate(picked)
    return frames[np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)]


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where asked, or for `auto` where the device has native bf16 units (on a CPU
    without them bf16 is emulated and slower than fp32)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). oneDNN's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) also says yes on plain AVX512, where bf16 is
    emulated: on such a 2-core Xeon, V trained at 152 frames/s in bf16 against 440 in fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: trust oneDNN
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@torch.no_grad()
def heldout_scores(model: VAE, frames: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Held-out reconstruction MSE per pixel (decoding mu, in float32) and mean KL per frame."""
    model.eval()
    sq_err = kl = 0.0
    for start in range(0, len(frames), batch_size):
        x = images_to_float(frames[start : start + batch_size])
        mu, logvar = model.encode(x)
        sq_err += (model.decode(mu) - x).pow(2).sum().item()
        kl += (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).sum().item()
    model.train()
    return {"mse": sq_err / frames.numel(), "kl": kl / len(frames)}


def image_grid(rows: list[np.ndarray], gap: int = 2) -> bytes:
    """PNG bytes of uint8 image rows (each (N, H, W, 3)), upscaled so small frames are visible."""
    from PIL import Image

    n, h, w, _ = rows[0].shape
    scale = max(1, 128 // h)
    grid = np.full((len(rows) * (h + gap) + gap, n * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            grid[y : y + h, x : x + w] = img
    size = (grid.shape[1] * scale, grid.shape[0] * scale)
    img = Image.fromarray(grid).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_pictures(model: VAE, frames: torch.Tensor, cfg: TrainVAEConfig, out: Path, epoch: int):
    """recon_epoch_NNNN.png (held-out frames above their reconstructions) and
    samples_epoch_NNNN.png (decoded z ~ N(0, I), the same z every epoch); also as recon.png and
    samples.png for the latest epoch. Returns the recon PNG's path."""
    model.eval()
    with torch.no_grad():
        pick = np.linspace(0, len(frames) - 1, min(cfg.grid_frames, len(frames))).round()
        real = frames[torch.from_numpy(pick.astype(np.int64)).to(frames.device)]
        recon = images_to_uint8(model.decode(model.encode(images_to_float(real))[0]))
        gen = torch.Generator(frames.device).manual_seed(cfg.seed)
        prior = images_to_uint8(model.sample(2 * cfg.grid_frames, generator=gen)).cpu().numpy()
    model.train()
    recon_png = image_grid([real.cpu().numpy(), recon.cpu().numpy()])
    samples_png = image_grid([prior[: cfg.grid_frames], prior[cfg.grid_frames :]])
    for name, data in (("recon", recon_png), ("samples", samples_png)):
        atomic_write_bytes(out / f"{name}_epoch_{epoch:04d}.png", data)
        atomic_write_bytes(out / f"{name}.png", data)
    return out / f"recon_epoch_{epoch:04d}.png"


def vae_config(cfg: TrainVAEConfig, frame_shape: list[int]) -> VAEConfig:
    """The model's config from the run's settings and the store's frame shape."""
    h, w, c = frame_shape
    if h != w:
        raise UserError(f"frames are {h}x{w}; the VAE needs square frames (set frame_size)")
    try:
        return VAEConfig(
            image_size=h,
            channels=c,
            z_dim=cfg.z_dim,
            widths=tuple(cfg.widths),
            kl_tolerance=cfg.kl_tolerance,
            bottom_rows=cfg.bottom_rows,
            bottom_weight=cfg.bottom_weight,
        )
    except ValueError as err:
        raise UserError(f"widths: {err}") from None


def parameter_count(vcfg: VAEConfig) -> int:
    return sum(p.numel() for p in VAE(vcfg).parameters())


def oversized_decoder_hint(vcfg: VAEConfig, params: int | None = None) -> str | None:
    """A hint when the encoder's last map is larger than 2x2 (e.g. 96x96 frames with World
    Models' four convs): the decoder then starts from 1x1 with a kernel as large as that map
    over all flat_size channels, most of the model's weights and time. None when it is not.
    `params`: the model's parameter count, when the caller has built it already."""
    size = vcfg.encoder_sizes()[-1]
    if size <= 2:
        return None
    widths, last = list(vcfg.widths), size
    while last > 2:  # one more conv of the last width each time
        widths.append(widths[-1])
        last = (last - 4) // 2 + 1
    try:
        smaller = replace(vcfg, widths=tuple(widths))
    except ValueError:  # the extra convs leave no map, or no decoder reaches image_size
        return None
    return (
        f"train-vae: {vcfg.image_size}x{vcfg.image_size} frames leave a {size}x{size} map after "
        f"{len(vcfg.widths)} convs, so the decoder's first layer is a {vcfg.decoder_kernels()[0]}x"
        f"{vcfg.decoder_kernels()[0]} kernel over {vcfg.flat_size} channels "
        f"({params or parameter_count(vcfg):,} parameters in all); widths={widths} would give "
        f"{parameter_count(smaller):,}"
    )


# ----------------------------------------------------------------------------------------------
# wm train-vae


def main(cfg: TrainVAEConfig) -> int:
    """Train the VAE on the store's frames for `cfg.epochs` epochs, resuming from a checkpoint."""
    layout = RunLayout.of(cfg)
    run = start_run(cfg, "vae", folder=layout.vae.name)
    device = resolve_device(cfg.device)
    store = open_store(cfg.store or layout.store)
    meta = store.info()
    train_eps, heldout_eps = split_episodes(store.indices(), cfg.heldout_fraction, cfg.seed)
    vcfg = vae_config(cfg, meta["frame_shape"])
    bf16 = use_bf16(cfg.precision, device)

    # build
    model = VAE(vcfg).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    ckpt_dir = layout.vae_checkpoints
    start_epoch = 0
    if latest_checkpoint(ckpt_dir) is not None:
        ckpt = load_checkpoint(ckpt_dir, map_location=device)
        if ckpt.model_spec is None or ckpt.model_spec.get("class") != "VAE":
            raise UserError(f"{ckpt.path}: not a VAE checkpoint (no model.yaml naming a VAE)")
        check_compatible(ckpt.model_spec["config"], to_dict(vcfg), SHAPE_KEYS, ckpt.path)
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        for group in optimizer.param_groups:  # a changed lr applies to the resumed run
            group["lr"] = cfg.lr
        set_rng_state(ckpt.state["rng"])
        start_epoch = ckpt.step
    heldout = torch.from_numpy(heldout_frames(store, heldout_eps, cfg.heldout_frames)).to(device)
    n_train = sum(store.length(i) + 1 for i in train_eps)
    per_epoch = min(n_train, cfg.max_frames_per_epoch or n_train) // cfg.batch_size
    n_pixels = heldout[0].numel()
    n_params = sum(p.numel() for p in model.parameters())
    run.log.info(
        f"train-vae: {len(train_eps)} training episodes ({n_train} frames), {len(heldout_eps)} "
        f"held out ({len(heldout)} frames scored), {per_epoch} steps of {cfg.batch_size} per "
        f"epoch, {n_params:,} parameters, "
        f"{'bf16 autocast' if bf16 else 'fp32'} on {device}"
        + (f", resuming after epoch {start_epoch}" if start_epoch else "")
    )
    if hint := oversized_decoder_hint(vcfg, n_params):
        run.log.warning(hint)
    if per_epoch == 0:
        raise UserError(f"batch_size {cfg.batch_size} is larger than the {n_train} training frames")
    if start_epoch >= cfg.epochs:
        run.log.info(f"train-vae: already trained for {start_epoch} epochs; nothing to do")
        run.close()
        return 0

    # loop
    for epoch in range(start_epoch, cfg.epochs):
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        steps = 0
        t0 = time.perf_counter()
        bar = progress(
            total=per_epoch,
            unit="step",
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        for batch in prefetch(train_batches(store, train_eps, cfg, epoch), cfg.prefetch_batches):
            x = images_to_float(batch.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()

            steps += 1
            for key, value in (("loss", out.loss), ("recon", out.recon_loss), ("kl", out.kl_loss)):
                sums[key] += value.item()
            if steps % cfg.log_every == 0:
                run.scalars(epoch * per_epoch + steps, step_loss=out.loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / steps:.1f}")
        bar.close()
        elapsed = time.perf_counter() - t0

        # log
        train = {k: v / max(steps, 1) for k, v in sums.items()}
        held = heldout_scores(model, heldout, cfg.batch_size)
        fps = steps * cfg.batch_size / elapsed
        grid = write_pictures(model, heldout, cfg, run.dir, epoch + 1)
        run.log.info(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {train['loss']:.1f} (mse/px "
            f"{train['recon'] / n_pixels:.5f}, kl {train['kl']:.1f}) | held-out mse/px "
            f"{held['mse']:.5f}, kl {held['kl']:.1f} | {fps:.0f} frames/s, {elapsed:.0f} s | {grid}"
        )
        run.scalars(
            epoch + 1,
            train_loss=train["loss"],
            train_mse=train["recon"] / n_pixels,
            train_kl=train["kl"],
            heldout_mse=held["mse"],
            heldout_kl=held["kl"],
            frames_per_s=fps,
        )

        # save
        state = {
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "epoch": epoch + 1,
            "heldout_episodes": heldout_eps,
            "heldout_mse": held["mse"],
        }
        save_checkpoint(
            ckpt_dir,
            epoch + 1,
            model.state_dict(),
            state,
            to_dict(cfg),
            keep=cfg.keep_checkpoints,
            model_spec=model_spec(model),
        )
    run.close()
    return 0
