"""`wm encode`: every stored episode turned into V's latents, for M to train on.

Runs the trained encoder over every episode of the store and writes mu and logvar of every frame
(float32 by default) next to the episode's actions, rewards and end flags into `<run>/latents`
(a latent store, see `worldmodels.latents`). M then draws a fresh z from each posterior every
epoch instead of training on one fixed sample. The latents belong to one checkpoint: episodes
already encoded by the same one are skipped (so a grown store costs only its new episodes), and
everything is encoded again when the VAE has changed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gen_core.config import setting
from gen_core.errors import UserError
from gen_core.runs import RunConfig, progress, resolve_device, start_run
from gen_core.vae import VAE, images_to_float
from rollouts.store import open_store
from worldmodels.agent import check_frames
from worldmodels.episodes import prefetch
from worldmodels.latents import LatentStore
from worldmodels.layout import RunLayout
from worldmodels.models import vae_from_checkpoint


@dataclass
class EncodeConfig(RunConfig):
    """Settings of `wm encode`."""

    store: str = setting(
        "", "episode store to encode, or minari:<dataset id> (default: <run_dir>/store)"
    )
    vae: str = setting(
        "", "VAE checkpoint: a step folder or a checkpoints folder (default: the run's latest)"
    )
    out: str = setting("", "latent store folder (default: <runs_dir>/<run_name>/latents)")
    batch_size: int = setting(500, "frames encoded at once", min=1)
    dtype: Literal["float32", "float16"] = setting(
        "float32", "dtype of the stored mu and logvar (float16 halves the files)"
    )


# ----------------------------------------------------------------------------------------------
# helpers


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@torch.no_grad()
def encode_frames(model: VAE, obs: np.ndarray, batch_size: int, device) -> tuple[np.ndarray, ...]:
    """mu, logvar (N, z_dim) float32 of uint8 frames (N, H, W, 3), in float32 on `device`."""
    mus, logvars = [], []
    for start in range(0, len(obs), batch_size):
        x = images_to_float(torch.from_numpy(obs[start : start + batch_size]).to(device))
        mu, logvar = model.encode(x)
        mus.append(mu.float().cpu().numpy())
        logvars.append(logvar.float().cpu().numpy())
    return np.concatenate(mus), np.concatenate(logvars)


# ----------------------------------------------------------------------------------------------
# wm encode


def main(cfg: EncodeConfig) -> int:
    """Encode every stored episode with the trained VAE into the latent store."""
    layout = RunLayout.of(cfg)
    run = start_run(cfg, "encode", folder=layout.encode.name)
    device = resolve_device(cfg.device)
    store = open_store(cfg.store or layout.store)
    store.info()
    model, ckpt = vae_from_checkpoint(cfg.vae or layout.vae_checkpoints, map_location=device)
    model = model.to(memory_format=torch.channels_last)
    check_frames(model, store.path, ckpt.path)
    vcfg = model.config

    # The latents belong to one checkpoint: keep them only if they were made by this very one.
    identity = {
        "vae_checkpoint": str(ckpt.path),
        "vae_step": ckpt.step,
        "vae_sha256": file_sha256(ckpt.path / "model.pt"),
        "z_dim": vcfg.z_dim,
        "dtype": cfg.dtype,
    }
    latents = LatentStore(cfg.out or layout.latents)
    try:
        old = latents.info() if latents.exists() else {}
    except UserError:  # unreadable metadata: encode everything again
        old = {}
    if old.get("store") and len(latents) and not _same_path(old["store"], store.path):
        raise UserError(
            f"{latents.path}: holds the latents of the store {old['store']}, this run encodes "
            f"{store.path}; set out= to another folder, or encode that store"
        )
    same = bool(old) and all(old.get(k) == v for k, v in identity.items() if k != "vae_checkpoint")
    if not same:
        if latents.exists() and len(latents):
            run.log.info(f"encode: the VAE changed; re-encoding all {len(latents)} episodes")
        latents.remove_episodes()
        latents.write_info({**identity, "store": str(store.path)})
    have = set(latents.indices())
    todo = [i for i in store.indices() if i not in have]
    run.log.info(
        f"encode: {len(todo)} of {len(store)} episodes to encode with {ckpt.path} "
        f"(epoch {ckpt.step}), {cfg.dtype} latents into {latents.path}"
    )

    frames = 0
    t0 = time.perf_counter()
    episodes = store.iter_episodes(("obs", "actions", "rewards", "terminated", "truncated"), todo)
    for index, ep in progress(
        prefetch(episodes, 2), total=len(todo), unit="ep", desc="encode", disable=not cfg.progress
    ):
        mu, logvar = encode_frames(model, ep.pop("obs"), cfg.batch_size, device)
        latent = {"mu": mu.astype(cfg.dtype), "logvar": logvar.astype(cfg.dtype)}
        latents.write_episode(index, {**latent, **ep})
        frames += len(mu)
    elapsed = time.perf_counter() - t0
    run.log.info(
        f"encode: {len(todo)} episodes, {frames} frames in {elapsed:.1f} s "
        f"({frames / max(elapsed, 1e-9):.0f} frames/s); latent store has {len(latents)} episodes"
    )
    run.close()
    return 0
