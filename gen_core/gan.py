"""DCGAN and WGAN-GP for images, written to read like nanoGPT's model.py.

Two papers, one pair of networks:

* DCGAN (Radford, Metz & Chintala 2016, "Unsupervised Representation Learning with Deep
  Convolutional Generative Adversarial Networks"): a generator of transposed convolutions
  (stride 2, batch norm, ReLU, tanh out) and a discriminator of strided convolutions (batch norm
  except on the first layer, LeakyReLU 0.2), weights drawn from N(0, 0.02), Adam with lr 2e-4
  and beta1 0.5. Trained with the non-saturating loss of Goodfellow et al. 2014: the
  discriminator minimises binary cross-entropy on real (label 1) and fake (label 0) images,
  the generator minimises the cross-entropy of its fakes against label 1.

* WGAN-GP (Gulrajani, Ahmed, Arjovsky, Dumoulin & Courville 2017, "Improved Training of
  Wasserstein GANs"): the same generator, but the discriminator becomes a critic f with no batch
  norm (the gradient penalty is taken per image, which batch norm's mixing of a batch would
  break) and a linear output. The critic minimises E[f(fake)] - E[f(real)] + lambda * GP with
  lambda = 10, and takes n_critic = 5 steps per generator step; the generator minimises
  -E[f(fake)]. Adam with lr 1e-4, betas (0, 0.9) (the paper's Algorithm 1).

    generator:      z (B, z_dim, 1, 1) --convT 4x4--> (B, 8w, 4, 4)   [for 64x64; w = g_width]
                    --convT s2--> (B, 4w, 8, 8) --> (B, 2w, 16, 16) --> (B, w, 32, 32)
                    --convT s2--> (B, 3, 64, 64), tanh
    discriminator:  (B, 3, 64, 64) --conv s2--> (B, w, 32, 32) --> (B, 2w, 16, 16)
                    --> (B, 4w, 8, 8) --> (B, 8w, 4, 4) --conv 4x4--> (B, 1, 1, 1) logit/score

Any power-of-two image size from 8 up works: the stacks gain or lose stride-2 layers, and the
width doubles with each layer away from the image. Images are float (B, C, H, W) in [-1, 1]
inside the networks (matching tanh); `sample` returns [0, 1] like the other image models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GANConfig:
    image_size: int = 64  # images are image_size x image_size, a power of two >= 8
    channels: int = 3  # colour channels of the images
    z_dim: int = 100  # size of the generator's noise vector (DCGAN: 100)
    g_width: int = 64  # generator channels next to the image; doubles per layer inward (ngf)
    d_width: int = 64  # discriminator channels next to the image; doubles per layer (ndf)
    loss: str = "dcgan"  # "dcgan": non-saturating BCE, batch-norm D; "wgan-gp": critic + GP
    gp_weight: float = 10.0  # lambda of the gradient penalty (WGAN-GP: 10)
    n_critic: int = 5  # critic steps per generator step (WGAN-GP: 5; DCGAN uses 1)

    def __post_init__(self) -> None:
        if self.loss not in ("dcgan", "wgan-gp"):
            raise ValueError(f"loss: expected 'dcgan' or 'wgan-gp', got {self.loss!r}")
        s = self.image_size
        if s < 8 or s & (s - 1):
            raise ValueError(f"image_size: expected a power of two >= 8, got {s}")

    @property
    def n_stride2(self) -> int:
        """Stride-2 layers between the 4x4 map and the image: log2(image_size) - 2 (64: 4)."""
        return self.image_size.bit_length() - 1 - 2

    def optimizer_defaults(self) -> dict:
        """The papers' Adam settings: DCGAN lr 2e-4, betas (0.5, 0.999); WGAN-GP 1e-4, (0, 0.9)."""
        if self.loss == "wgan-gp":
            return {"lr": 1e-4, "betas": (0.0, 0.9)}
        return {"lr": 2e-4, "betas": (0.5, 0.999)}


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        n = config.n_stride2
        widths = [config.g_width * 2 ** (n - 1 - i) for i in range(n)]  # 64x64: 512 256 128 64
        # no biases before batch norm: its shift makes them redundant (as in DCGAN's code)
        layers = [
            nn.ConvTranspose2d(config.z_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], config.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, z_dim) -> (B, z_dim, 1, 1) -> (B, 8w, 4, 4) ... -> (B, 3, 64, 64) in [-1, 1]
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """DCGAN's discriminator (batch_norm=True) or WGAN-GP's critic (batch_norm=False)."""

    def __init__(self, config: GANConfig, batch_norm: bool):
        super().__init__()
        n = config.n_stride2
        widths = [config.d_width * 2**i for i in range(n)]  # 64x64: 64 128 256 512
        # the first layer sees raw pixels: DCGAN puts no batch norm there
        layers = [nn.Conv2d(config.channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0))  # (B, 8w, 4, 4) -> (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 64, 64) in [-1, 1] -> (B,) logit (DCGAN) or critic score (WGAN-GP)
        return self.net(x).flatten()


def gradient_penalty(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP's penalty E[(||grad_x f(x_hat)||_2 - 1)^2] on random interpolates, a scalar.

    Interpolation (Gulrajani et al. 2017, Algorithm 1): one eps ~ U[0, 1) per image, drawn as
    `torch.rand(B, 1, 1, 1, generator=generator)`, and x_hat = eps * real + (1 - eps) * fake,
    i.e. a random point on the straight line between each real image and the fake image of
    the same batch position. The gradient is taken with respect to x_hat, per image, flattened
    over (C, H, W); the graph is kept (`create_graph`) so the penalty trains the critic. The
    result is not multiplied by lambda: the caller weighs it.
    """
    b = real.size(0)
    eps = torch.rand(b, 1, 1, 1, generator=generator, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)  # (B, C, H, W)
    score = critic(x_hat)  # (B,)
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)  # (B, C, H, W)
    norm = grad.flatten(1).norm(2, dim=1)  # (B,)
    return (norm - 1).pow(2).mean()


class GAN(nn.Module):
    """A generator and a discriminator (or critic) with the loss of `config.loss`."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config, batch_norm=config.loss == "dcgan")
        self.apply(dcgan_init)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I), (n, z_dim), on the model's device."""
        device = next(self.parameters()).device
        return torch.randn(n, self.config.z_dim, generator=generator, device=device)

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss the discriminator (critic) minimises on one batch, and figures to log.

        real, fake: (B, C, H, W) in [-1, 1]; `fake` is detached here, so only D gets gradients.
        DCGAN:   BCE(D(real), 1) + BCE(D(fake), 0)
        WGAN-GP: f(fake).mean() - f(real).mean() + gp_weight * gradient_penalty
        """
        fake = fake.detach()
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)  # (B,), (B,)
        if self.config.loss == "dcgan":
            loss = F.binary_cross_entropy_with_logits(
                d_real, torch.ones_like(d_real)
            ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            return loss, {"d_loss": loss.item(), "d_real": torch.sigmoid(d_real).mean().item()}
        wasserstein = d_real.mean() - d_fake.mean()  # the critic's estimate of W(real, fake)
        gp = gradient_penalty(self.discriminator, real, fake, generator)
        loss = -wasserstein + self.config.gp_weight * gp
        return loss, {"d_loss": loss.item(), "wasserstein": wasserstein.item(), "gp": gp.item()}

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """The loss the generator minimises: BCE(D(fake), 1) (DCGAN) or -f(fake).mean()."""
        d_fake = self.discriminator(fake)  # (B,)
        if self.config.loss == "dcgan":
            return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        return -d_fake.mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` images (n, C, H, W) in [0, 1] from z ~ N(0, I), in the generator's current mode
        (call `.eval()` first to use batch norm's running statistics)."""
        return (self.generator(self.noise(n, generator)) + 1) / 2
