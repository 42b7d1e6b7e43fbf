"""Denoising diffusion (DDPM) with a compact U-Net, DDIM sampling and an EMA of the weights.

* DDPM (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"): a fixed forward
  process adds Gaussian noise over T = 1000 steps, q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1},
  beta_t I), which has the closed form q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with
  abar_t = prod_{s<=t} (1 - beta_s). A U-Net eps_theta(x_t, t) learns to predict the noise
  (the paper's "simple" loss, || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2
  with t uniform), and ancestral sampling runs the learned reverse chain from x_T ~ N(0, I).
  Betas rise linearly from 1e-4 to 0.02.
* The cosine schedule (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic
  Models"): abar_t = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008,
  betas clipped at 0.999; it destroys information more evenly than the linear schedule.
* DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"): the same trained
  network sampled along a subsequence of the timesteps (e.g. 50 instead of 1000); eta = 0 is a
  deterministic map from x_T to an image, eta = 1 is DDPM's ancestral sampler.
* The EMA of the weights (Ho et al. use decay 0.9999) is what samples are drawn from.
* v-prediction (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
  Models"): the network predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 instead of eps;
  x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, so the prediction stays well scaled at every t.
* Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy"): each timestep's loss is weighted by min(SNR_t, gamma) / SNR_t
  (eps-prediction) or min(SNR_t, gamma) / (SNR_t + 1) (v-prediction), SNR_t = abar_t / (1 -
  abar_t), which caps the weight of the nearly noise-free steps; the paper reports about 3x
  faster convergence with gamma = 5.

The U-Net follows Ho et al.'s (itself a PixelCNN++ / Wide-ResNet U-Net), made compact:

    conv_in      (B, 3, 64, 64) -> (B, ch, 64, 64)
    down levels  per level: res blocks (+ self-attention at the listed resolutions), then a
                 stride-2 conv;  64 -> 32 -> 16 -> 8 with widths ch * mults
    middle       res block, self-attention, res block at the lowest resolution
    up levels    mirror of the down path, each res block fed the matching skip activation,
                 nearest-neighbour upsampling + conv between levels
    conv_out     GroupNorm, SiLU, conv -> (B, 3, 64, 64) predicted noise (initialised to zero)

Every res block adds a projection of the sinusoidal timestep embedding (as in the Transformer's
position encoding, Vaswani et al. 2017) to its feature maps. Images are (B, C, H, W) in [-1, 1]
inside the model; `sample` returns [0, 1] like the other image models.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class DiffusionConfig:
    image_size: int = 64  # images are image_size x image_size (divisible by 2^(levels - 1))
    channels: int = 3  # colour channels of the images
    width: int = 64  # U-Net channels at full resolution (Ho et al.: 128)
    mults: tuple[int, ...] = (1, 2, 2, 2)  # width multiplier per resolution level
    res_blocks: int = 1  # res blocks per level on the way down (Ho et al.: 2)
    attn_resolutions: tuple[int, ...] = (16,)  # resolutions with self-attention (Ho et al.: 16)
    dropout: float = 0.0  # dropout inside res blocks (Ho et al.: 0.1 on CIFAR-10)
    timesteps: int = 1000  # T, steps of the forward process
    schedule: str = "linear"  # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)
    beta_start: float = 1e-4  # first beta of the linear schedule
    beta_end: float = 0.02  # last beta of the linear schedule
    prediction: str = "eps"  # what the network predicts: "eps" (Ho et al.) or "v" (Salimans & Ho)
    weighting: str = "none"  # loss weight per timestep: "none" or "min-snr" (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (Hang et al.: 5)

    def __post_init__(self) -> None:
        self.mults = tuple(int(m) for m in self.mults)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        check_process(self)
        if not self.mults:
            raise ValueError("mults: expected at least one level")
        if self.image_size % 2 ** (len(self.mults) - 1):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^{len(self.mults) - 1} "
                f"({len(self.mults)} levels)"
            )


def check_process(config) -> None:
    """ValueError for a bad setting of the diffusion process (schedule, prediction, weighting),
    shared by every config that has them."""
    if config.schedule not in ("linear", "cosine"):
        raise ValueError(f"schedule: expected 'linear' or 'cosine', got {config.schedule!r}")
    if config.prediction not in ("eps", "v"):
        raise ValueError(f"prediction: expected 'eps' or 'v', got {config.prediction!r}")
    if config.weighting not in ("none", "min-snr"):
        raise ValueError(f"weighting: expected 'none' or 'min-snr', got {config.weighting!r}")
    if config.min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma: expected > 0, got {config.min_snr_gamma}")


# ----------------------------------------------------------------------------------------------
# noise schedules


def linear_betas(timesteps: int, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s betas, evenly spaced from `start` to `end` (given for T = 1000; other T
    scale them by 1000 / T so that the total amount of noise stays about the same, as Nichol &
    Dhariwal's code does), clipped at 0.999 like the cosine schedule so abar_t stays above 0."""
    scale = 1000 / timesteps
    betas = torch.linspace(scale * start, scale * end, timesteps, dtype=torch.float64)
    return betas.clamp(max=0.999)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's betas: abar_t follows a squared cosine, betas clipped at 0.999."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # (T + 1,)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)  # (T,)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in Vaswani et al. 2017."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


# ----------------------------------------------------------------------------------------------
# the U-Net


def _norm(channels: int) -> nn.GroupNorm:
    # Ho et al. use 32 groups (4 channels each at width 128). Narrow U-Nets keep at least 4
    # channels per group: with one channel per group GroupNorm becomes InstanceNorm, which
    # erases each channel's mean over the image, and the samples' overall colours go wrong.
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as the identity (its skip path)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: (B, c_in, H, W), temb: (B, t_dim)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]  # timestep, broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, c_out, H, W)
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H * W positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, like the res blocks
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w)  # (B, 3, C, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W) noisy images and (B,) timesteps -> (B, C, H, W) noise."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        ch, t_dim = config.width, 4 * config.width
        self.width = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(config.channels, ch, 3, padding=1)

        # down path: remember every activation's width, the up path consumes them as skips
        self.down = nn.ModuleList()
        skips, c, res = [ch], ch, config.image_size
        for level, mult in enumerate(config.mults):
            for _ in range(config.res_blocks):
                block = nn.ModuleList([ResBlock(c, ch * mult, t_dim, config.dropout)])
                c = ch * mult
                if res in config.attn_resolutions:
                    block.append(SelfAttention(c))
                self.down.append(block)
                skips.append(c)
            if level < len(config.mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
                res //= 2

        self.mid1 = ResBlock(c, c, t_dim, config.dropout)
        self.mid_attn = SelfAttention(c)
        self.mid2 = ResBlock(c, c, t_dim, config.dropout)

        # up path: one more res block per level than on the way down, as in Ho et al.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.mults))):
            for _ in range(config.res_blocks + 1):
                block = nn.ModuleList([ResBlock(c + skips.pop(), ch * mult, t_dim, config.dropout)])
                c = ch * mult
                if res in config.attn_resolutions:
                    block.append(SelfAttention(c))
                self.up.append(block)
            if level > 0:
                self.up.append(nn.ModuleList([nn.Conv2d(c, c, 3, padding=1)]))  # after 2x up
                res *= 2

        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, config.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predict zero noise at first: a stable start
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 64, 64), t: (B,) integer timesteps
        temb = self.time_mlp(timestep_embedding(t, self.width))  # (B, 4 ch)
        h = self.conv_in(x)  # (B, ch, 64, 64)
        hs = [h]
        for block in self.down:
            if isinstance(block[0], ResBlock):
                h = block[0](h, temb)
                for attn in block[1:]:
                    h = attn(h)
            else:
                h = block[0](h)  # stride-2 conv: (B, c, H, W) -> (B, c, H/2, W/2)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)  # (B, c, 8, 8)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = block[0](torch.cat([h, hs.pop()], dim=1), temb)  # skip joins on channels
                for attn in block[1:]:
                    h = attn(h)
            else:
                h = block[0](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, c, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 64, 64)


# ----------------------------------------------------------------------------------------------
# the diffusion process


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """values[t] reshaped to (B, 1, ...) to broadcast over samples of `ndim` dimensions
    (4 for images (B, C, H, W), 2 for vectors (B, D))."""
    return values[t].float().view(-1, *([1] * (ndim - 1)))


class Diffusion(nn.Module):
    """A U-Net, its EMA copy and the noise schedule: loss, q_sample, DDPM and DDIM samplers.

    Everything but the network and the shape of a sample is the same for any data: a subclass
    (`gen_core.latent_diffusion.LatentDiffusion`) swaps in another denoiser through `net`,
    `sample_shape`, `clip_x0` and `to_output`."""

    clip_x0 = True  # clip predicted x_0 to [-1, 1], the data range of images

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)  # what samples are drawn from
        self.register_schedule(config)

    @property
    def net(self) -> nn.Module:
        """The trained denoiser (the EMA copy is `ema`)."""
        return self.unet

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (C, H, W)."""
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def to_output(self, x: torch.Tensor) -> torch.Tensor:
        """A final x_0 in the model's space -> what `sample` returns: images in [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    def register_schedule(self, config) -> None:
        """Buffers of the noise schedule named by `config` (schedule, timesteps, betas)."""
        if config.schedule == "linear":
            betas = linear_betas(config.timesteps, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(config.timesteps)
        abar = torch.cumprod(1 - betas, dim=0)  # (T,) abar_t, in float64 for the small 1 - abar
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # derived from the config, so not saved with the weights (persistent=False)
        for name, value in {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            # variance of the posterior q(x_{t-1} | x_t, x_0), Ho et al. eq. 7
            "posterior_variance": betas * (1 - abar_prev) / (1 - abar),
        }.items():
            self.register_buffer(name, value, persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) in closed form: sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        abar = _gather(self.alphas_cumprod, t, x0.dim())  # (B, 1, ...)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: the noise (eps), or v = sqrt(abar_t) eps -
        sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, appendix D)."""
        if self.config.prediction == "eps":
            return noise
        abar = _gather(self.alphas_cumprod, t, x0.dim())
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) weight of each sample's squared error: 1, or min-SNR-gamma's min(SNR, gamma) /
        SNR for eps-prediction and min(SNR, gamma) / (SNR + 1) for v-prediction (Hang et al.
        2023, where both equal min(SNR, gamma) / SNR in the x_0 loss they correspond to)."""
        if self.config.weighting == "none":
            return torch.ones(t.shape, device=t.device)
        abar = self.alphas_cumprod[t]
        snr = abar / (1 - abar)  # (B,) float64: SNR_t is huge near t = 0
        capped = snr.clamp(max=self.config.min_snr_gamma)
        return (capped / (snr if self.config.prediction == "eps" else snr + 1)).float()

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ho et al.'s simple loss on data x0 (B, ...) (images in [-1, 1]): the mean squared
        error of the predicted noise (or v), with t uniform over 0..T-1 and fresh noise per
        sample, each sample's error weighted by `loss_weight`."""
        b = x0.size(0)
        t = torch.randint(0, self.config.timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        err = (self.net(self.q_sample(x0, t, noise), t) - self.target(x0, t, noise)).pow(2)
        per_sample = err.flatten(1).mean(1)  # (B,)
        if self.config.weighting == "none":
            return per_sample.mean()
        return (self.loss_weight(t) * per_sample).mean()

    @torch.no_grad()
    def update_ema(self, decay: float, step: int | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * weights. With `step`, the decay is capped at
        (1 + step) / (10 + step), so that a short run's EMA is not stuck near the random
        initialisation (0.9999 averages over ~10,000 steps)."""
        if step is not None:
            decay = min(decay, (1 + step) / (10 + step))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(self.ema.buffers(), self.net.buffers()):
            e.copy_(b)

    def _predict_x0(self, net: nn.Module, x: torch.Tensor, t: int, clip: bool):
        """(eps, x0) predicted at timestep t; x0 clipped to [-1, 1] when `clip`, with eps then
        recomputed from the clipped x0 so that the two stay consistent."""
        ts = torch.full((x.size(0),), t, device=x.device, dtype=torch.long)
        out = net(x, ts)
        abar = self.alphas_cumprod[t].float()
        if self.config.prediction == "eps":
            eps = out
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        else:  # v: x_0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(1 - abar) x_t + sqrt(abar) v
            x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
            eps = (1 - abar).sqrt() * x + abar.sqrt() * out
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps, x0

    def _net(self, use_ema: bool) -> nn.Module:
        return self.ema if use_ema else self.net

    @torch.no_grad()
    def sample_ddpm(
        self,
        n: int,
        generator: torch.Generator | None = None,
        clip: bool | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling through all T steps (Ho et al. Algorithm 2), (n, C, H, W) in [0, 1].

        Each step draws x_{t-1} from the posterior q(x_{t-1} | x_t, x0_pred): the mean of Ho et
        al.'s eq. 7 with the predicted x_0 (clipped to the data range, as in their code, unless
        `clip` is False; None: the model's `clip_x0`) and the posterior variance beta~_t; no
        noise is added at the last step.
        """
        clip = self.clip_x0 if clip is None else clip
        net, x = self._net(use_ema), self._initial_noise(n, generator)
        for t in reversed(range(self.config.timesteps)):
            _, x0 = self._predict_x0(net, x, t, clip)
            abar, abar_prev = self.alphas_cumprod[t], self.alphas_cumprod_prev[t]
            beta = self.betas[t]
            coef_x0 = (abar_prev.sqrt() * beta / (1 - abar)).float()
            coef_xt = ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)).float()
            x = coef_x0 * x0 + coef_xt * x  # posterior mean
            if t > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device)
                x = x + self.posterior_variance[t].float().sqrt() * noise
        return self.to_output(x)

    @torch.no_grad()
    def sample_ddim(
        self,
        n: int,
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip: bool | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """DDIM sampling (Song et al. eq. 12) on `steps` evenly spaced timesteps, (n, C, H, W)
        in [0, 1]. eta = 0: deterministic given x_T; eta = 1: the variance of DDPM's posterior.

            x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z
            sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)

        With steps = T and eta = 1 this is exactly `sample_ddpm` (the same noise is drawn in
        the same order from `generator`).
        """
        if not 1 <= steps <= self.config.timesteps:
            raise ValueError(f"steps: expected 1..{self.config.timesteps}, got {steps}")
        clip = self.clip_x0 if clip is None else clip
        net, x = self._net(use_ema), self._initial_noise(n, generator)
        seq = self.ddim_timesteps(steps)
        for i in reversed(range(len(seq))):
            t = seq[i]
            eps, x0 = self._predict_x0(net, x, t, clip)
            abar = self.alphas_cumprod[t]
            abar_prev = self.alphas_cumprod[seq[i - 1]] if i > 0 else abar.new_tensor(1.0)
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt().float()
            x = abar_prev.sqrt().float() * x0 + direction * eps
            if i > 0 and eta > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device)
                x = x + sigma.float() * noise
        return self.to_output(x)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spread from T-1 down to 0, returned ascending (all of them
        when steps = T). Starting at T-1 rather than Song et al.'s T - T/steps makes sampling
        begin from pure noise, which is what x_T ~ N(0, I) is."""
        seq = torch.linspace(self.config.timesteps - 1, 0, steps, dtype=torch.float64)
        return sorted({int(round(v)) for v in seq.tolist()})

    def _initial_noise(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        device = self.alphas_cumprod.device
        return torch.randn(n, *self.sample_shape, generator=generator, device=device)  # x_T

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        steps: int = 50,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """`n` samples (images (n, C, H, W) in [0, 1]) from the EMA weights: DDIM with `steps`
        steps, or DDPM's ancestral sampler when steps = T and eta = 1."""
        if steps == self.config.timesteps and eta == 1.0:
            return self.sample_ddpm(n, generator)
        return self.sample_ddim(n, steps, eta, generator)
