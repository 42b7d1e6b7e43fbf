"""Latent diffusion: a DDPM/DDIM over the latent vectors of an autoencoder, decoded by it.

Latent diffusion (Rombach, Blattmann, Lorenz, Esser & Ommer 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models") trains the diffusion model on the codes of a frozen
autoencoder instead of on pixels, and decodes its samples with the autoencoder's decoder; the
diffusion model is then small and fast, and the autoencoder does the pixel work. Here the codes
are vectors (a VAE's z, e.g. World Models' V with 32 dimensions), so the denoiser is not a
U-Net but a residual MLP with the timestep injected by adaptive LayerNorm, the denoiser that
Li, Tian, Li, Deng & He 2024 ("Autoregressive Image Generation without Vector Quantization")
use for per-token diffusion:

    z_t (B, z_dim) --linear--> (B, w)
    depth x ResBlock:  h + gate * MLP((1 + scale) * LN(h) + shift), (shift, scale, gate) from
                       the timestep embedding (B, w); the gate starts at zero (identity block)
    LN, linear (zero-initialised) -> (B, z_dim) predicted eps (or v)

As Stable Diffusion scales its latents to unit variance, the latents are standardised per
dimension with statistics of the training codes (`set_latent_stats`, saved with the weights)
before noising, and samples are mapped back. The process, schedules, prediction targets, loss
weighting, samplers and EMA are `gen_core.diffusion.Diffusion`'s; predicted x_0 is not clipped
(latents have no fixed range). This module knows nothing of the autoencoder: `sample` returns
latents (n, z_dim), which the caller decodes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gen_core.diffusion import Diffusion, check_process, timestep_embedding


@dataclass
class LatentDiffusionConfig:
    z_dim: int = 32  # size of the latent vectors (World Models' V: 32)
    width: int = 512  # hidden width of the residual MLP
    depth: int = 4  # residual blocks
    dropout: float = 0.0  # dropout inside the blocks
    timesteps: int = 1000  # T, steps of the forward process
    schedule: str = "cosine"  # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)
    beta_start: float = 1e-4  # first beta of the linear schedule
    beta_end: float = 0.02  # last beta of the linear schedule
    prediction: str = "v"  # "v" (Salimans & Ho 2022; stable unclipped) or "eps"
    weighting: str = "none"  # loss weight per timestep: "none" or "min-snr" (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting

    def __post_init__(self) -> None:
        check_process(self)
        for name in ("z_dim", "width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")


class ResBlock(nn.Module):
    """Pre-LayerNorm MLP block modulated by the timestep (adaptive LayerNorm, gated)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.modulation = nn.Linear(width, 3 * width)  # shift, scale, gate from the timestep
        nn.init.zeros_(self.modulation.weight)  # gate 0: the block starts as the identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # h: (B, w), temb: (B, w)
        shift, scale, gate = self.modulation(F.silu(temb)).chunk(3, dim=1)  # 3 x (B, w)
        x = self.norm(h) * (1 + scale) + shift  # (B, w)
        x = self.fc2(self.dropout(F.silu(self.fc1(x))))  # (B, w)
        return h + gate * x


class ResMLP(nn.Module):
    """eps_theta(z_t, t): (B, z_dim) noisy latents and (B,) timesteps -> (B, z_dim)."""

    def __init__(self, config: LatentDiffusionConfig):
        super().__init__()
        w = config.width
        self.width = w
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.proj_in = nn.Linear(config.z_dim, w)
        self.blocks = nn.ModuleList(ResBlock(w, config.dropout) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(w)
        self.proj_out = nn.Linear(w, config.z_dim)
        nn.init.zeros_(self.proj_out.weight)  # predict zero noise at first, like the U-Net
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # z: (B, z_dim), t: (B,) integer timesteps
        temb = self.time_mlp(timestep_embedding(t, self.width))  # (B, w)
        h = self.proj_in(z)  # (B, w)
        for block in self.blocks:
            h = block(h, temb)  # (B, w)
        return self.proj_out(self.norm_out(h))  # (B, z_dim)


class LatentDiffusion(Diffusion):
    """A residual-MLP denoiser over standardised latent vectors, its EMA and the schedule."""

    clip_x0 = False  # latents have no fixed range

    def __init__(self, config: LatentDiffusionConfig):
        nn.Module.__init__(self)
        self.config = config
        self.denoiser = ResMLP(config)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.register_schedule(config)
        # per-dimension statistics of the training latents, saved with the weights
        self.register_buffer("latent_mean", torch.zeros(config.z_dim))
        self.register_buffer("latent_std", torch.ones(config.z_dim))

    @property
    def net(self) -> nn.Module:
        return self.denoiser

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.config.z_dim,)

    @torch.no_grad()
    def set_latent_stats(self, z: torch.Tensor) -> None:
        """Standardise with the mean and standard deviation of latents `z` (N, z_dim)."""
        self.latent_mean.copy_(z.mean(0))
        self.latent_std.copy_(z.std(0).clamp(min=1e-4))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, z_dim) -> the standardised space the diffusion runs in."""
        return (z - self.latent_mean) / self.latent_std

    def to_output(self, x: torch.Tensor) -> torch.Tensor:
        """A final standardised sample -> latents in the autoencoder's space (B, z_dim)."""
        return x * self.latent_std + self.latent_mean

    def loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion's loss on raw latents `z` (B, z_dim), standardised here."""
        return super().loss(self.normalise(z), generator)
