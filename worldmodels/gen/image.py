"""`wm gen train-image`, `wm gen sample` and `wm gen eval`: image generators from the core models.

    wm gen train-image model=dcgan data=runs/carracing_small/store run_name=cars
    wm gen sample checkpoint=runs/cars/image_dcgan n=64
    wm gen eval checkpoint=runs/cars/image_dcgan

Five models share one training stage, one data reader and one evaluation:

* vae         `gen_core.vae.VAE` (World Models' V), samples decoded from z ~ N(0, I)
* dcgan       `gen_core.gan.GAN` with the non-saturating loss (Radford et al. 2016)
* wgan-gp     `gen_core.gan.GAN` with a critic and gradient penalty (Gulrajani et al. 2017)
* ddpm        `gen_core.diffusion.Diffusion` (Ho et al. 2020), sampled with DDIM (Song et al.
              2021); optionally v-prediction, min-SNR weighting, the cosine schedule
* latent-ddpm `gen_core.latent_diffusion.LatentDiffusion` over the latents of a trained VAE
              (`vae=<checkpoint>`, e.g. V of `wm train-vae`), decoded by it (Rombach et al.
              2022). The training images are encoded once, at the start; the checkpoint
              records V's step folder and the SHA-256 of its weights, and sampling loads it.

`data` is a rollout store (a folder with store.json, from `wm collect`) or a folder of PNG/JPEG
images (read with PIL, resized to image_size, held in memory). A fraction `held_out` of the
data is never trained on: whole episodes of a store (frames of one episode are near-copies of
each other, so a frame-level split would leak), or single images of a folder. `wm gen eval`
prints, as one JSON line, the Fréchet distance of samples to that held-out part (`fd`) and to
training images (`fd_train`), each with reference values computed the same way for real
images, a mean image and noise, and the nearest-neighbour memorisation figures (`nn_ratio`);
see `gen_core.image_metrics` for the feature space and why both FDs are given.

A run writes `<runs_dir>/<run_name>/image_<model>/`: config.yaml (resolved settings), log.txt,
tb/ (TensorBoard scalars), samples/step_NNNNNNNN.png (a grid of samples from fixed noise every
`sample_every` steps) and checkpoints/ (every `checkpoint_every` steps and at the end). Running
the same command again resumes from the latest checkpoint. `time_budget_s` stops a run after
that many seconds of training, which is how the benchmark gives each model the same CPU time.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gen_core.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    model_spec,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.config import ConfigError, setting, to_dict
from gen_core.diffusion import Diffusion, DiffusionConfig
from gen_core.errors import UserError
from gen_core.gan import GAN, GANConfig
from gen_core.image_metrics import (
    FeatureConfig,
    FeatureNet,
    compute_features,
    fd_of_features,
    memorisation,
    train_feature_net,
)
from gen_core.io import atomic_write_bytes
from gen_core.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from gen_core.runs import (
    RunConfig,
    progress,
    resolve_device,
    seed_everything,
    set_threads,
    start_run,
)
from gen_core.vae import VAE, VAEConfig, images_to_float, images_to_uint8
from rollouts.store import EpisodeStore

MODELS = ("vae", "dcgan", "wgan-gp", "ddpm", "latent-ddpm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Settings that fix the shapes of the weights: a checkpoint can only be resumed with the same.
SHAPE_KEYS = [
    "model", "image_size", "width", "z_dim", "ddpm_mults", "ddpm_res_blocks", "ddpm_attention",
    "timesteps", "schedule", "prediction", "depth",
]  # fmt: skip
# Shape keys added later, with the value a checkpoint written before them was trained with.
SHAPE_KEY_DEFAULTS = {"prediction": "auto", "depth": 4}
# What `width=0` and `z_dim=0` mean for each model: the papers' (or World Models') values.
DEFAULT_WIDTH = {"vae": 32, "dcgan": 64, "wgan-gp": 64, "ddpm": 64, "latent-ddpm": 512}
DEFAULT_Z_DIM = {"vae": 32, "dcgan": 100, "wgan-gp": 100}
# Adam learning rates for `lr=0`: the GANs' papers' (DCGAN 2e-4, WGAN-GP 1e-4). World Models'
# VAE (1e-4) and Ho et al.'s DDPM (2e-4) were trained for hundreds of thousands of steps; CPU
# runs get hundreds, where 1e-3 learns much faster (DDPM on 32x32 CarRacing frames, batch 32,
# 60 s: loss 0.35 at 2e-4, 0.054 at 1e-3 after the same 76 steps; gradients clipped at 1).
DEFAULT_LR = {"vae": 1e-3, "dcgan": 2e-4, "wgan-gp": 1e-4, "ddpm": 1e-3, "latent-ddpm": 1e-3}
# What `prediction=auto` means: eps for pixels (Ho et al.); v for latents, which are not clipped
# to a range while sampling, where eps-prediction's x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
# divides the network's error by sqrt(abar_T) ~ 0.03 at the first step and samples blow up.
DEFAULT_PREDICTION = {"ddpm": "eps", "latent-ddpm": "v"}


@dataclass
class TrainImageConfig(RunConfig):
    """Train an image generator (vae, dcgan, wgan-gp, ddpm, latent-ddpm) on frames or images."""

    model: Literal["vae", "dcgan", "wgan-gp", "ddpm", "latent-ddpm"] = setting(
        "vae", "which generator to train"
    )
    data: str = setting("", "a rollout store folder (with store.json) or a folder of PNG/JPEG")
    vae: str = setting(
        "", "latent-ddpm: the VAE checkpoint (step, checkpoints or stage folder) it works in"
    )
    image_size: int = setting(64, "images are resized to image_size x image_size", min=8)
    held_out: float = setting(
        0.1, "fraction of the episodes (store) or images (folder) never trained on", min=0, max=0.5
    )
    steps: int = setting(
        5000, "training steps in total (generator steps for GANs); a resumed run continues", min=1
    )
    time_budget_s: float = setting(
        0.0, "stop after this many seconds of training in this invocation (0: no limit)", min=0
    )
    batch_size: int = setting(64, "real images per step (per critic step for wgan-gp)", min=1)
    lr: float = setting(
        0.0, "Adam learning rate (0: vae 1e-3, dcgan 2e-4, wgan-gp 1e-4, ddpm 1e-3)", min=0
    )
    width: int = setting(
        0,
        "channels at full resolution (0: vae 32, dcgan/wgan-gp 64, ddpm 64); latent-ddpm: "
        "hidden width of its MLP (0: 512)",
        min=0,
    )
    depth: int = setting(4, "latent-ddpm: residual blocks of its MLP", min=1)
    z_dim: int = setting(0, "latent size of vae and GANs (0: vae 32, GANs 100)", min=0)
    kl_tolerance: float = setting(0.5, "vae: KL floor per latent dimension, nats", min=0)
    n_critic: int = setting(5, "wgan-gp: critic steps per generator step", min=1)
    gp_weight: float = setting(10.0, "wgan-gp: weight lambda of the gradient penalty", min=0)
    timesteps: int = setting(1000, "ddpm: steps T of the forward process", min=2)
    schedule: Literal["linear", "cosine"] = setting("linear", "ddpm: beta schedule")
    prediction: Literal["auto", "eps", "v"] = setting(
        "auto", "ddpm: what the network predicts (auto: eps for ddpm, v for latent-ddpm)"
    )
    weighting: Literal["none", "min-snr"] = setting(
        "none", "ddpm: loss weight per timestep (min-snr: Hang et al. 2023)"
    )
    min_snr_gamma: float = setting(
        5.0, "ddpm: gamma of min-snr weighting", min=0, min_inclusive=False
    )
    latent: Literal["sample", "mean"] = setting(
        "sample", "latent-ddpm: train on z drawn from V's posterior, or on its mean"
    )
    max_latents: int = setting(
        100000, "latent-ddpm: training images encoded (a random subset if more)", min=1
    )
    ddpm_mults: list[int] = setting([1, 2, 2, 2], "ddpm: U-Net width multiplier per level")
    ddpm_res_blocks: int = setting(1, "ddpm: residual blocks per U-Net level", min=1)
    ddpm_attention: list[int] = setting([16], "ddpm: resolutions with self-attention")
    ema_decay: float = setting(
        0.9999, "ddpm: decay of the weights' EMA used for sampling (warmed up early on)", max=1
    )
    grad_clip: float = setting(1.0, "ddpm: clip the gradient norm to this (0: off)", min=0)
    ddim_steps: int = setting(50, "ddpm: DDIM steps for the sample grids", min=1)
    eta: float = setting(0.0, "ddpm: DDIM eta for the sample grids (0: deterministic)", min=0)
    log_every: int = setting(50, "steps between log lines and TensorBoard scalars", min=1)
    sample_every: int = setting(500, "steps between sample grids (samples/step_N.png)", min=1)
    checkpoint_every: int = setting(500, "steps between checkpoints", min=1)
    grid_n: int = setting(64, "images in each sample grid", min=1)

    def validate(self) -> None:
        super().validate()
        if self.model in ("dcgan", "wgan-gp") and (
            self.image_size & (self.image_size - 1) or self.image_size < 8
        ):
            raise ConfigError(f"image_size: {self.model} needs a power of two >= 8")
        if self.model in ("ddpm", "latent-ddpm") and self.ddim_steps > self.timesteps:
            raise ConfigError(f"ddim_steps: expected at most timesteps ({self.timesteps})")
        if self.model == "latent-ddpm" and not self.vae:
            raise ConfigError("vae: latent-ddpm needs a trained VAE (set vae=CHECKPOINT)")

    @property
    def stage(self) -> str:
        return f"image_{self.model}"


@dataclass
class SampleImageConfig(RunConfig):
    """Draw images from a train-image checkpoint and write them as a PNG grid."""

    checkpoint: str = setting("", "a step folder, checkpoints folder or image_<model> run folder")
    n: int = setting(64, "images to draw", min=1)
    out: str = setting("", "PNG path (default: <run stage>/samples/sample_step_N_seed_S.png)")
    npy: bool = setting(False, "also write the images as uint8 (n, H, W, 3) in a .npy beside it")
    sampler: Literal["ddim", "ddpm"] = setting(
        "ddim", "ddpm only: DDIM with ddim_steps, or ancestral sampling through all T steps"
    )
    ddim_steps: int = setting(50, "ddpm only: DDIM steps", min=1)
    eta: float = setting(0.0, "ddpm only: DDIM eta (0: deterministic, 1: DDPM-like)", min=0)
    temperature: float = setting(1.0, "vae only: z ~ N(0, temperature^2 I)", min=0)
    vae: str = setting("", "latent-ddpm only: decode with this VAE (default: its own)")


@dataclass
class EvalImageConfig(RunConfig):
    """Print Fréchet distances (with references) and memorisation figures as one JSON line."""

    checkpoint: str = setting("", "a step folder, checkpoints folder or image_<model> run folder")
    data: str = setting("", "data to compare with (default: the checkpoint's training data)")
    n: int = setting(500, "generated and held-out real images compared (fewer if fewer held out)")
    features: str = setting(
        "",
        "feature-net checkpoint folder; trained on the data's training part and saved there if "
        "missing (default: <run>/image_features); use the same one to compare models",
    )
    feature_steps: int = setting(600, "training steps of a new feature net", min=1)
    max_train_images: int = setting(
        20000, "training images searched for nearest neighbours (a random subset if more)", min=1
    )
    sampler: Literal["ddim", "ddpm"] = setting("ddim", "ddpm only: sampler (see wm gen sample)")
    ddim_steps: int = setting(50, "ddpm only: DDIM steps", min=1)
    eta: float = setting(0.0, "ddpm only: DDIM eta", min=0)
    temperature: float = setting(1.0, "vae only: z ~ N(0, temperature^2 I)", min=0)
    vae: str = setting("", "latent-ddpm only: decode with this VAE (default: its own)")
    batch_size: int = setting(100, "images per generation batch", min=1)


# ----------------------------------------------------------------------------------------------
# data


class ImageData:
    """A rollout store or an image folder, split into a training and a held-out part.

    Everything comes out as uint8 (N, H, W, 3) tensors of image_size x image_size.
    """

    def __init__(self, path: str | Path, image_size: int, held_out: float):
        if not str(path):
            raise UserError("data: expected a rollout store or image folder (set data=PATH)")
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: data folder not found")
        self.image_size = image_size
        self.is_store = (self.path / "store.json").is_file()
        if self.is_store:
            self.store = EpisodeStore(self.path)
            self.store.info()  # a one-line error if store.json is not a store's
            units = self.store.indices()
            if not units:
                raise UserError(f"{self.path}: the store has no complete episodes")
        else:
            self.files = sorted(
                p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not self.files:
                raise UserError(f"{self.path}: no images (.png, .jpg, .jpeg) and no store.json")
            units = list(range(len(self.files)))
            self._images: torch.Tensor | None = None
        self.train_units, self.held_units = split_units(units, held_out)

    @property
    def kind(self) -> str:
        return "store" if self.is_store else "folder"

    def count(self, part: str) -> int:
        """Images in `part` ("train" or "held_out"), counted without decompressing frames."""
        units = self.train_units if part == "train" else self.held_units
        return sum(self.store.length(i) + 1 for i in units) if self.is_store else len(units)

    def _folder_images(self) -> torch.Tensor:
        if self._images is None:
            self._images = torch.from_numpy(
                np.stack([read_image(p, self.image_size) for p in self.files])
            )
        return self._images

    def load(self, part: str, limit: int | None = None, seed: int = 0) -> torch.Tensor:
        """All images of `part` ("train" or "held_out"), or a random `limit` of them."""
        units = self.train_units if part == "train" else self.held_units
        rng = np.random.default_rng(seed)
        if not self.is_store:
            images = self._folder_images()[units]
            if limit is not None and len(images) > limit:
                images = images[np.sort(rng.choice(len(images), limit, replace=False))]
            return images
        # A store is read one episode at a time, keeping about `limit` frames spread over all
        # episodes, so a large store is never held whole.
        total = self.count(part)
        keep = 1.0 if limit is None else min(1.0, limit / total)
        picked = []
        for i in units:
            obs = self.store.load(i, ("obs",))["obs"]
            if keep < 1.0:
                n_keep = math.ceil(keep * len(obs))  # rounded up: trimmed to `limit` below
                obs = obs[np.sort(rng.choice(len(obs), n_keep, replace=False))]
            picked.append(resize_frames(torch.from_numpy(obs), self.image_size))
        images = torch.cat(picked)
        if limit is not None and len(images) > limit:
            images = images[np.sort(rng.choice(len(images), limit, replace=False))]
        return images

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless shuffled training batches (B, H, W, 3); a new order every pass, set by seed."""
        for epoch in range(sys.maxsize):
            n = 0
            for batch in self._epoch(batch_size, seed * 100_003 + epoch):
                n += 1
                yield batch
            if n == 0:
                raise UserError(f"{self.path}: fewer training images than batch_size={batch_size}")

    def _epoch(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        if not self.is_store:
            images = self._folder_images()[self.train_units]
            order = torch.from_numpy(np.random.default_rng(seed).permutation(len(images)))
            for i in range(0, len(images) - batch_size + 1, batch_size):
                yield images[order[i : i + batch_size]]
            return
        frames = self.store.iter_frames(
            batch_size, indices=self.train_units, shuffle=True, seed=seed, drop_last=True
        )
        for batch in frames:
            yield resize_frames(torch.from_numpy(np.ascontiguousarray(batch)), self.image_size)


def split_units(units: list[int], held_out: float) -> tuple[list[int], list[int]]:
    """(train, held-out): a fixed pseudo-random `held_out` fraction of the episodes or images.

    The choice depends only on the list (never on the run's seed), so every model trained on the
    same data holds out the same part and their evaluations compare like with like.
    """
    if held_out <= 0:
        return list(units), []
    if len(units) < 2:
        raise UserError(
            f"data: {len(units)} episode(s)/image(s) cannot be split into a training and a "
            "held-out part (add data or set held_out=0)"
        )
    order = np.random.default_rng(12345).permutation(len(units))
    n_held = min(len(units) - 1, max(1, round(held_out * len(units))))
    held = set(order[:n_held].tolist())
    return (
        [u for k, u in enumerate(units) if k not in held],
        [u for k, u in enumerate(units) if k in held],
    )


def read_image(path: Path, size: int) -> np.ndarray:
    """A PNG/JPEG file as uint8 (size, size, 3) RGB, resized (box filter when shrinking)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                shrink = img.size[0] > size or img.size[1] > size
                img = img.resize((size, size), Image.BOX if shrink else Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{path}: cannot read image ({type(err).__name__})") from None


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) frames at size x size (area average when shrinking)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    mode = "area" if frames.shape[1] > size else "bilinear"
    x = F.interpolate(x, size=(size, size), mode=mode)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def grid_png(images: torch.Tensor, gap: int = 1) -> bytes:
    """PNG bytes of a square-ish grid of float images (N, C, H, W) in [0, 1]."""
    from PIL import Image

    imgs = images_to_uint8(images).cpu().numpy()  # (N, H, W, 3)
    n, h, w, c = imgs.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 255, dtype=np.uint8)
    for k, img in enumerate(imgs):
        y, x = gap + (k // cols) * (h + gap), gap + (k % cols) * (w + gap)
        grid[y : y + h, x : x + w] = img
    buf = io.BytesIO()
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# models


ModelConfig = VAEConfig | GANConfig | DiffusionConfig | LatentDiffusionConfig
MODEL_CLASSES = {
    VAEConfig: VAE, GANConfig: GAN, DiffusionConfig: Diffusion,
    LatentDiffusionConfig: LatentDiffusion,
}  # fmt: skip


def new_model(model_config: ModelConfig) -> nn.Module:
    """A freshly initialised model from its config (`model_config(cfg)`)."""
    return MODEL_CLASSES[type(model_config)](model_config)


def image_kind(spec: dict[str, Any]) -> str:
    """The kind of model (vae, dcgan, wgan-gp, ddpm, latent-ddpm) a model.yaml describes."""
    if spec["class"] == "GAN":
        return spec["config"].get("loss", "dcgan")
    return {"VAE": "vae", "Diffusion": "ddpm", "LatentDiffusion": "latent-ddpm"}[spec["class"]]


class DecodedLatents(nn.Module):
    """A latent diffusion model and the VAE that decodes its samples: samples like `Diffusion`,
    (n, C, H, W) images in [0, 1]."""

    def __init__(self, prior: LatentDiffusion, vae: VAE):
        super().__init__()
        self.prior, self.vae = prior, vae

    def sample_ddim(self, n, steps=50, eta=0.0, generator=None) -> torch.Tensor:
        return self.vae.decode(self.prior.sample_ddim(n, steps, eta, generator))

    def sample_ddpm(self, n, generator=None) -> torch.Tensor:
        return self.vae.decode(self.prior.sample_ddpm(n, generator))


def load_vae_for_latents(path: str | Path, device, sha256: str = "") -> tuple[VAE, Path, str]:
    """(VAE in eval mode and frozen, its step folder, SHA-256 of its model.pt); with `sha256`,
    a one-line error if the weights found are not those."""
    import hashlib

    vae, ck = load_model(path, map_location=device, kinds=("VAE",))
    digest = hashlib.sha256((ck.path / "model.pt").read_bytes()).hexdigest()
    if sha256 and digest != sha256:
        raise UserError(
            f"{ck.path}: not the VAE this latent-ddpm was trained with (its weights changed); "
            "pass the right one with vae=PATH"
        )
    return vae.eval().requires_grad_(False), ck.path.resolve(), digest


@torch.no_grad()
def encode_latents(vae: VAE, images: torch.Tensor, batch_size: int = 256):
    """uint8 (N, H, W, 3) images -> V's posterior mean and standard deviation, each (N, z_dim)."""
    device = vae.decoder.fc.weight.device
    mus, stds = [], []
    for i in range(0, len(images), batch_size):
        mu, logvar = vae.encode(images_to_float(images[i : i + batch_size].to(device)))
        mus.append(mu.float().cpu())
        stds.append(logvar.float().mul(0.5).exp().cpu())
    return torch.cat(mus), torch.cat(stds)


def latent_batches(mu: torch.Tensor, std: torch.Tensor, batch_size: int, sample: bool):
    """Endless random batches (B, z_dim) of latents: posterior draws or means (global RNG)."""
    if len(mu) < batch_size:
        raise UserError(f"data: fewer training images ({len(mu)}) than batch_size={batch_size}")
    return _latent_batches(mu, std, batch_size, sample)


def _latent_batches(mu, std, batch_size: int, sample: bool):
    while True:
        ix = torch.randint(0, len(mu), (batch_size,))
        yield mu[ix] + std[ix] * torch.randn(batch_size, mu.size(1)) if sample else mu[ix]


def model_config(cfg: TrainImageConfig, z_dim: int = 0) -> ModelConfig:
    """The model's config dataclass from the run's settings (latent-ddpm: V's `z_dim`)."""
    w = cfg.width or DEFAULT_WIDTH[cfg.model]
    z = cfg.z_dim or DEFAULT_Z_DIM.get(cfg.model, 0)
    s = cfg.image_size
    try:
        if cfg.model == "vae":
            # one stride-2 conv per halving down to about 2x2 (64: 4 layers, World Models')
            n_layers = max(1, int(math.log2(s)) - 2)
            widths = tuple(w * 2**i for i in range(n_layers))
            mc: Any = VAEConfig(image_size=s, z_dim=z, widths=widths, kl_tolerance=cfg.kl_tolerance)
        elif cfg.model in ("dcgan", "wgan-gp"):
            mc = GANConfig(
                image_size=s, z_dim=z, g_width=w, d_width=w, loss=cfg.model,
                gp_weight=cfg.gp_weight, n_critic=cfg.n_critic,
            )  # fmt: skip
        elif cfg.model == "ddpm":
            mc = DiffusionConfig(
                image_size=s, width=w, mults=tuple(cfg.ddpm_mults),
                res_blocks=cfg.ddpm_res_blocks, attn_resolutions=tuple(cfg.ddpm_attention),
                timesteps=cfg.timesteps, schedule=cfg.schedule, prediction=prediction(cfg),
                weighting=cfg.weighting, min_snr_gamma=cfg.min_snr_gamma,
            )  # fmt: skip
        else:
            mc = LatentDiffusionConfig(
                z_dim=z_dim, width=w, depth=cfg.depth, timesteps=cfg.timesteps,
                schedule=cfg.schedule, prediction=prediction(cfg), weighting=cfg.weighting,
                min_snr_gamma=cfg.min_snr_gamma,
            )  # fmt: skip
    except ValueError as err:
        raise UserError(f"{cfg.model} at image_size={s}: {err}") from None
    return mc


def prediction(cfg: TrainImageConfig) -> str:
    return DEFAULT_PREDICTION[cfg.model] if cfg.prediction == "auto" else cfg.prediction


def make_optimizers(kind: str, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
    """Adam per trained network, with the papers' betas (GANs: see GANConfig)."""
    if kind == "vae":
        return {"vae": torch.optim.Adam(model.parameters(), lr=lr or DEFAULT_LR[kind])}
    if kind in ("dcgan", "wgan-gp"):
        opt = model.config.optimizer_defaults()
        opt["lr"] = lr or opt["lr"]
        return {
            "g": torch.optim.Adam(model.generator.parameters(), **opt),
            "d": torch.optim.Adam(model.discriminator.parameters(), **opt),
        }
    name = "unet" if kind == "ddpm" else "denoiser"
    return {name: torch.optim.Adam(model.net.parameters(), lr=lr or DEFAULT_LR[kind])}


@torch.no_grad()
def generate(
    kind: str,
    model: nn.Module,
    n: int,
    generator: torch.Generator,
    batch_size: int = 100,
    sampler: str = "ddim",
    ddim_steps: int = 50,
    eta: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`n` images (n, C, H, W) in [0, 1] from any of the models, in eval mode, in batches.

    All randomness comes from `generator`, so a fixed seed gives the same images."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        if kind == "vae":
            out.append(model.sample(b, generator=generator, temperature=temperature))
        elif kind in ("dcgan", "wgan-gp"):
            out.append(model.sample(b, generator=generator))
        elif sampler == "ddpm":
            out.append(model.sample_ddpm(b, generator=generator))
        else:
            out.append(model.sample_ddim(b, ddim_steps, eta, generator=generator))
    model.train(was_training)
    return torch.cat(out)


def to_model_input(batch: torch.Tensor, kind: str, device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) channels_last: [0, 1] (vae) or [-1, 1]."""
    x = images_to_float(batch.to(device, non_blocking=True))
    return x if kind == "vae" else x * 2 - 1


# ----------------------------------------------------------------------------------------------
# one training step per model: (losses to log, real images used)


def vae_step(model: VAE, opts, batches, cfg, step: int, device) -> tuple[dict[str, float], int]:
    x = to_model_input(next(batches), "vae", device)
    out = model(x)
    opts["vae"].zero_grad(set_to_none=True)
    out.loss.backward()
    opts["vae"].step()
    figures = {"loss": out.loss.item(), "recon": out.recon_loss.item(), "kl": out.kl_loss.item()}
    return figures, len(x)


def gan_step(model: GAN, opts, batches, cfg, step: int, device) -> tuple[dict[str, float], int]:
    """n_critic discriminator steps (1 for DCGAN) on fresh real batches, then a generator step."""
    n_d = model.config.n_critic if model.config.loss == "wgan-gp" else 1
    used = 0
    for _ in range(n_d):
        real = to_model_input(next(batches), cfg.model, device)
        fake = model.generator(model.noise(len(real)))  # (B, 3, H, W); detached in the loss
        d_loss, figures = model.discriminator_loss(real, fake)
        opts["d"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["d"].step()
        used += len(real)
    model.discriminator.requires_grad_(False)  # no weight gradients for D in G's step
    g_loss = model.generator_loss(model.generator(model.noise(cfg.batch_size)))
    opts["g"].zero_grad(set_to_none=True)
    g_loss.backward()
    opts["g"].step()
    model.discriminator.requires_grad_(True)
    return {**figures, "g_loss": g_loss.item()}, used


def ddpm_step(
    model: Diffusion, opts, batches, cfg, step: int, device
) -> tuple[dict[str, float], int]:
    """One step of pixel (uint8 image batches) or latent (float latent batches) diffusion."""
    batch = next(batches)
    x = to_model_input(batch, "ddpm", device) if cfg.model == "ddpm" else batch.to(device)
    loss = model.loss(x)
    (opt,) = opts.values()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), cfg.grad_clip)
    opt.step()
    model.update_ema(cfg.ema_decay, step)
    return {"loss": loss.item()}, len(x)


TRAIN_STEP = {
    "vae": vae_step, "dcgan": gan_step, "wgan-gp": gan_step, "ddpm": ddpm_step,
    "latent-ddpm": ddpm_step,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# wm gen train-image


def main(cfg: TrainImageConfig) -> dict[str, Any]:
    """Train (or resume) and return a summary: step, last losses, images/s, checkpoint."""
    data = ImageData(cfg.data, cfg.image_size, cfg.held_out)  # data errors before a run folder
    vae = None
    if cfg.model == "latent-ddpm":  # V's errors too
        vae = load_vae_for_latents(cfg.vae, resolve_device(cfg.device))
        if vae[0].config.image_size != cfg.image_size:
            raise UserError(
                f"vae: {vae[1]} is for {vae[0].config.image_size}x{vae[0].config.image_size} "
                f"images, image_size is {cfg.image_size}"
            )
    mcfg = model_config(cfg, vae[0].config.z_dim if vae else 0)  # setting errors before a run
    run = start_run(cfg, cfg.stage)
    try:
        return _train(cfg, run, data, mcfg, vae)
    finally:
        run.close()


def _train(
    cfg: TrainImageConfig, run, data: ImageData, mcfg: ModelConfig, vae=None
) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    ckpt_dir = run.dir / "checkpoints"
    latest = latest_checkpoint(ckpt_dir)
    ckpt = load_checkpoint(latest, map_location=device) if latest is not None else None

    # build
    model = new_model(mcfg).to(device)
    model = model.to(memory_format=torch.channels_last)  # the fastest conv layout on CPU
    opts = make_optimizers(cfg.model, model, cfg.lr)
    step, figures, restarts = 0, {}, 0
    v_record = {}
    if vae is not None:
        v_record = {"vae": str(vae[1]), "vae_sha256": vae[2]}
        if ckpt is not None and ckpt.state.get("vae_sha256") != vae[2]:
            raise UserError(
                f"{ckpt.path}: cannot resume, trained with the VAE {ckpt.state.get('vae')}, "
                f"vae= names other weights ({vae[1]})"
            )
    if ckpt is not None:
        saved = {**SHAPE_KEY_DEFAULTS, **ckpt.config}
        check_compatible(saved, to_dict(cfg), SHAPE_KEYS, ckpt.path)
        model.load_state_dict(ckpt.model)
        for name, opt in opts.items():
            opt.load_state_dict(ckpt.state["optimizers"][name])
        set_rng_state(ckpt.state["rng"])
        step, figures = ckpt.step, dict(ckpt.state.get("figures", {}))
        restarts = int(ckpt.state.get("restarts", 0)) + 1
        run.log.info(f"resuming from {ckpt.path} (step {step} of {cfg.steps})")
    else:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.log.info(
            f"{cfg.model}: {n_params:,} parameters, {data.kind} {data.path} with "
            f"{len(data.train_units)} training / {len(data.held_units)} held-out "
            f"{'episodes' if data.is_store else 'images'}, {cfg.image_size}x{cfg.image_size}, "
            f"device {device}, {torch.get_num_threads()} threads"
        )
    # A resumed run reads the data in a new order (seeded by the restart count): the position
    # inside a shuffled epoch is not saved, and repeating the first batches would bias training.
    batches = data.batches(cfg.batch_size, cfg.seed + 7919 * restarts)
    sampler_model = model
    if vae is not None:
        # every training image is encoded once; batches are drawn from the codes
        t_enc = time.perf_counter()
        images = data.load("train", limit=cfg.max_latents, seed=cfg.seed)
        mu, std = encode_latents(vae[0], images)
        if ckpt is None:
            model.set_latent_stats(mu if cfg.latent == "mean" else mu + std * torch.randn_like(mu))
        batches = latent_batches(mu, std, cfg.batch_size, cfg.latent == "sample")
        sampler_model = DecodedLatents(model, vae[0])
        run.log.info(
            f"encoded {len(mu)} training images with {vae[1]} in {time.perf_counter() - t_enc:.1f}s"
        )
    grid_noise_seed = cfg.seed  # the same noise for every grid, so grids show progress

    def save(step: int) -> None:
        state = {
            "optimizers": {k: o.state_dict() for k, o in opts.items()},
            "rng": rng_state(),
            "figures": figures,
            "restarts": restarts,
            **v_record,
        }
        save_checkpoint(
            ckpt_dir, step, model.state_dict(), state, to_dict(cfg), model_spec=model_spec(model)
        )

    def write_grid(step: int) -> Path:
        gen = torch.Generator(device).manual_seed(grid_noise_seed)
        images = generate(
            cfg.model, sampler_model, cfg.grid_n, gen, ddim_steps=cfg.ddim_steps, eta=cfg.eta
        )
        path = run.dir / "samples" / f"step_{step:08d}.png"
        atomic_write_bytes(path, grid_png(images))
        return path

    # loop
    train_step = TRAIN_STEP[cfg.model]
    start_step, images_seen, train_seconds = step, 0, 0.0
    stopped_by_budget = False
    bar = progress(
        total=cfg.steps, initial=step, desc=f"train-image {cfg.model}", unit="step",
        disable=not cfg.progress,
    )  # fmt: skip
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[run.log]):
            model.train()
            t0 = time.perf_counter()
            while step < cfg.steps:
                figures, used = train_step(model, opts, batches, cfg, step, device)
                step += 1
                images_seen += used
                bar.update(1)
                over_budget = cfg.time_budget_s > 0 and (
                    train_seconds + time.perf_counter() - t0 >= cfg.time_budget_s
                )
                done = step == cfg.steps or over_budget
                if step % cfg.log_every == 0 or done:
                    train_seconds += time.perf_counter() - t0
                    rate = images_seen / max(train_seconds, 1e-9)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in figures.items()}, refresh=False)
                    run.log.info(
                        f"step {step}/{cfg.steps}: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
                        + f", {rate:,.0f} images/s"
                    )
                    run.scalars(step, **figures, images_per_s=rate)
                    t0 = time.perf_counter()
                if step % cfg.sample_every == 0 or done:
                    train_seconds += time.perf_counter() - t0
                    write_grid(step)
                    t0 = time.perf_counter()
                if step % cfg.checkpoint_every == 0 or done:
                    train_seconds += time.perf_counter() - t0
                    save(step)
                    t0 = time.perf_counter()
                if over_budget:
                    stopped_by_budget = True
                    run.log.info(f"time budget of {cfg.time_budget_s:g}s reached at step {step}")
                    break
    finally:
        bar.close()
    if step == start_step:
        run.log.info(f"already trained for {step} steps; raise steps to go on")
    return {
        "model": cfg.model,
        "step": step,
        "steps_this_run": step - start_step,
        "figures": figures,
        "train_images_per_s": images_seen / train_seconds if train_seconds else None,
        "train_seconds": train_seconds,
        "stopped_by_budget": stopped_by_budget,
        "checkpoint": str(latest_checkpoint(ckpt_dir)),
        "last_grid": str(run.dir / "samples" / f"step_{step:08d}.png"),
    }


# ----------------------------------------------------------------------------------------------
# loading a trained model (sample, eval)


def load_image_model(path: str | Path, device, vae: str = "") -> tuple[str, nn.Module, Any]:
    """(kind, model in eval mode, checkpoint) of a train-image checkpoint. A latent-ddpm comes
    with its VAE (`DecodedLatents`): the one it was trained with, or the one at `vae`."""
    if not str(path):
        raise UserError("checkpoint: expected a train-image checkpoint (set checkpoint=PATH)")
    kinds = ("VAE", "GAN", "Diffusion", "LatentDiffusion")
    model, ckpt = load_model(path, map_location=device, kinds=kinds)
    kind = image_kind(ckpt.model_spec)
    if ckpt.config.get("model") != kind:  # e.g. V of `wm train-vae`, not trained by train-image
        raise UserError(f"{ckpt.path}: not a train-image checkpoint (a {kind} of another stage)")
    if kind == "latent-ddpm":
        if not (vae or ckpt.state.get("vae")):
            raise UserError(f"{ckpt.path}: records no VAE to decode with (pass vae=PATH)")
        v, _, _ = load_vae_for_latents(vae or ckpt.state["vae"], device, ckpt.state["vae_sha256"])
        model = DecodedLatents(model, v).eval()
    return kind, model, ckpt


def stage_dir(ckpt_path: Path) -> Path:
    """The image_<model> folder a step folder belongs to (or the step folder's parent)."""
    parent = ckpt_path.parent
    return parent.parent if parent.name == "checkpoints" else parent


# ----------------------------------------------------------------------------------------------
# wm gen sample


def sample_main(cfg: SampleImageConfig) -> dict[str, Any]:
    """Write `n` samples as a PNG grid (and .npy if asked); print the PNG's path."""
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    kind, model, ckpt = load_image_model(cfg.checkpoint, device, cfg.vae)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    images = generate(
        kind, model, cfg.n, gen, sampler=cfg.sampler, ddim_steps=cfg.ddim_steps, eta=cfg.eta,
        temperature=cfg.temperature,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    out = Path(cfg.out) if cfg.out else (
        stage_dir(ckpt.path) / "samples" / f"sample_step_{ckpt.step:08d}_seed_{cfg.seed}.png"
    )  # fmt: skip
    atomic_write_bytes(out, grid_png(images))
    if cfg.npy:
        buf = io.BytesIO()
        np.save(buf, images_to_uint8(images).cpu().numpy())
        atomic_write_bytes(out.with_suffix(".npy"), buf.getvalue())
    print(out)
    return {"png": str(out), "n": cfg.n, "samples_per_s": cfg.n / seconds}


# ----------------------------------------------------------------------------------------------
# wm gen eval


def load_or_train_features(
    path: Path, data: ImageData, steps: int, device, log=None
) -> tuple[FeatureNet, Path]:
    """The feature net saved at `path`, or a new one trained on the data's training part."""
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        if log:
            log(f"no feature net at {path}: training one on {data.path} ({steps} steps)")
        fcfg = FeatureConfig(image_size=data.image_size)
        batch_size = min(64, data.count("train"))
        batches = (images_to_float(b.to(device)) for b in data.batches(batch_size, seed=0))
        spread = images_to_float(data.load("train", limit=5000, seed=0))
        net, mse = train_feature_net(batches, fcfg, spread, steps=steps, seed=0, device=device)
        info = {"data": str(data.path), "image_size": data.image_size, "steps": steps}
        spec = model_spec(net)
        found = save_checkpoint(path, steps, net.state_dict(), {"mse": mse}, info, model_spec=spec)
    net, ckpt = load_model(found, map_location=device, kinds=("FeatureNet",))
    if net.config.image_size != data.image_size:
        raise UserError(
            f"{ckpt.path}: the feature net is for {net.config.image_size}x"
            f"{net.config.image_size} images, the model makes {data.image_size}x{data.image_size}"
        )
    return net.eval().requires_grad_(False), ckpt.path


def eval_main(cfg: EvalImageConfig) -> dict[str, Any]:
    """Print one JSON line: FDs to held-out and training images, references, memorisation."""
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    kind, model, ckpt = load_image_model(cfg.checkpoint, device, cfg.vae)
    trained_on = ckpt.config
    data = ImageData(
        cfg.data or trained_on.get("data", ""),
        trained_on["image_size"],
        trained_on.get("held_out", 0.1),
    )
    if not data.held_units:
        raise UserError("the checkpoint was trained with held_out=0: nothing to evaluate against")
    features_path = Path(cfg.features) if cfg.features else (
        stage_dir(ckpt.path).parent / "image_features"
    )  # fmt: skip

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    net, features_ckpt = load_or_train_features(features_path, data, cfg.feature_steps, device, log)
    held = data.load("held_out", limit=cfg.n, seed=cfg.seed)
    n = len(held)  # FD is biased by the set size: every FD below uses n images per side
    train = data.load("train", limit=cfg.max_train_images, seed=cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    samples = generate(
        kind, model, n, gen, batch_size=cfg.batch_size, sampler=cfg.sampler,
        ddim_steps=cfg.ddim_steps, eta=cfg.eta, temperature=cfg.temperature,
    )  # fmt: skip
    sample_seconds = time.perf_counter() - t0
    result = {
        "model": kind,
        "step": ckpt.step,
        "n": n,
        **image_scores(net, samples, held, train, seed=cfg.seed),
        "samples_per_s": n / sample_seconds,
        "sampler": sampler_name(kind, cfg.sampler, cfg.ddim_steps, cfg.eta),
        "features": str(features_ckpt),
        "checkpoint": str(ckpt.path),
    }
    print(json.dumps(result))
    return result


def sampler_name(kind: str, sampler: str, ddim_steps: int, eta: float) -> str:
    if kind == "vae":
        return "decode z ~ N(0, I)"
    if kind in ("dcgan", "wgan-gp"):
        return "generator(z ~ N(0, I)), batch-norm running statistics"
    decoded = ", decoded by the VAE" if kind == "latent-ddpm" else ""
    if sampler == "ddpm":
        return "ddpm ancestral, all T steps, EMA weights" + decoded
    return f"ddim {ddim_steps} steps, eta {eta:g}, EMA weights" + decoded


def image_scores(
    net: FeatureNet, samples: torch.Tensor, held: torch.Tensor, train: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """Both FDs of the samples, their references and the memorisation figures.

    samples: float (n, C, H, W) in [0, 1]; held, train: uint8 (N, H, W, 3). Every FD uses n
    images per side (FD is biased by the set size). Two disjoint random sets A and B of n
    training frames are drawn:

        fd                        samples vs held-out frames
        fd_real_ref               B vs held-out: where real frames of other episodes score
        fd_train                  samples vs A (FID's usual comparison with the training set)
        fd_train_real_ref         B vs A: the floor of fd_train at this n
        fd_mean_frame_ref, fd_noise_ref, fd_train_mean_frame_ref, fd_train_noise_ref:
                                  n copies of the mean training frame, and uniform noise,
                                  against the held-out frames and against A
    """
    n = len(samples)
    held = held[:n]
    rng = np.random.default_rng(seed)
    n_ref = min(n, len(train) // 2)
    pick = rng.choice(len(train), 2 * n_ref, replace=False)
    set_a, set_b = train[np.sort(pick[:n_ref])], train[np.sort(pick[n_ref:])]
    total = sum(images_to_float(train[i : i + 1000]).sum(0) for i in range(0, len(train), 1000))
    mean_frame = (total / len(train)).expand(n, -1, -1, -1)  # in chunks: train may be large
    noise = torch.rand(samples.shape, generator=torch.Generator().manual_seed(seed))

    images = {
        "samples": samples,
        "held": images_to_float(held),
        "a": images_to_float(set_a),
        "b": images_to_float(set_b),
        "mean_frame": mean_frame,
        "noise": noise,
    }
    feats = {name: compute_features(net, x) for name, x in images.items()}
    scores = {}
    for prefix, ref in (("fd", "held"), ("fd_train", "a")):
        scores[prefix] = fd_of_features(feats["samples"], feats[ref])
        scores[f"{prefix}_real_ref"] = fd_of_features(feats["b"], feats[ref])
        scores[f"{prefix}_mean_frame_ref"] = fd_of_features(feats["mean_frame"], feats[ref])
        scores[f"{prefix}_noise_ref"] = fd_of_features(feats["noise"], feats[ref])
    return {**scores, **memorisation(samples, held, train)}
