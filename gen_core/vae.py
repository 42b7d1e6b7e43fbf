"""A convolutional variational autoencoder for images, written to read like nanoGPT's model.py.

The model is the VAE of Kingma & Welling 2014 ("Auto-Encoding Variational Bayes") in the
convolutional form that World Models (Ha & Schmidhuber 2018, "World Models", appendix A.1) used
as its vision model V: each 64x64 RGB image is compressed to a small latent vector z.

    encoder: 4 convs, kernel 4, stride 2, ReLU      (B, 3, 64, 64) -> (B, 256, 2, 2)
             two dense heads                        (B, 1024)      -> mu, logvar (B, z_dim)
    decoder: dense                                  (B, z_dim)     -> (B, 1024, 1, 1)
             4 transposed convs, stride 2, ReLU     kernels 5, 5, 6, 6 -> (B, 3, 64, 64)
             sigmoid                                pixels in [0, 1]

Image size, channel widths and z_dim are configurable; the decoder kernels are then derived so
that the output is exactly the input size (for 64x64 the rule gives World Models' 5, 5, 6, 6).

The loss is World Models': the sum of squared errors over all pixels (a Gaussian likelihood with
fixed variance) plus the KL divergence of the posterior from N(0, I), floored per image at
`kl_tolerance * z_dim` nats. The floor (0.5 nats per dimension in World Models) stops the
optimiser from pushing the KL below it, which keeps the latents informative instead of letting
them collapse onto the prior early in training; below the floor the KL term has no gradient.

Images are float tensors (B, C, H, W) in [0, 1]; `images_to_float` and `images_to_uint8` convert
from and to the uint8 (B, H, W, C) layout of stored frames. The float tensor returned by
`images_to_float` is a view in channels_last memory order, which is also the fastest order for
the convolutions on CPU, so no copy is made on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class VAEConfig:
    image_size: int = 64  # input images are image_size x image_size
    channels: int = 3  # colour channels of the images
    z_dim: int = 32  # size of the latent vector z
    widths: tuple[int, ...] = (32, 64, 128, 256)  # encoder conv channels; decoder mirrors them
    kl_tolerance: float = 0.5  # KL floor per latent dim in nats (World Models: 0.5; 0: plain VAE)
    bottom_rows: int = (
        0  # rows at the image's bottom whose squared error counts bottom_weight times
    )
    bottom_weight: float = 1.0  # (e.g. CarRacing's status bar, where the speed is drawn)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths:
            raise ValueError("widths: expected at least one conv layer")
        if self.encoder_sizes()[-1] < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.widths)} stride-2 convs"
            )
        self.decoder_kernels()  # raises if no decoder reaches image_size

    def encoder_sizes(self) -> list[int]:
        """Spatial size after each encoder conv (kernel 4, stride 2, no padding): 64 31 14 6 2."""
        sizes = [self.image_size]
        for _ in self.widths:
            sizes.append((sizes[-1] - 4) // 2 + 1)
        return sizes

    @property
    def flat_size(self) -> int:
        """Features out of the encoder convs, and width of the decoder's dense layer (1024)."""
        return self.widths[-1] * self.encoder_sizes()[-1] ** 2

    def decoder_kernels(self) -> tuple[int, ...]:
        """Kernel sizes of the transposed convs taking a 1x1 map up to exactly image_size.

        A stride-2 transposed conv maps size s to 2s - 2 + k. Walking back from the output, each
        layer takes k = 6 for an even size and k = 5 for an odd one (so the input size is a whole
        number), and the first layer's kernel is the size it must produce from 1x1. For 64 this is
        64 <- 30 <- 13 <- 5 <- 1, i.e. World Models' kernels (5, 5, 6, 6).
        """
        size, kernels = self.image_size, []
        for _ in range(len(self.widths) - 1):
            k = 6 if size % 2 == 0 else 5
            kernels.append(k)
            size = (size + 2 - k) // 2
        if size < 2:
            raise ValueError(
                f"image_size {self.image_size} is too small for a {len(self.widths)}-layer decoder"
            )
        kernels.append(size)  # 1x1 -> size x size
        return tuple(reversed(kernels))


class VAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W) reconstruction in [0, 1]
    mu: torch.Tensor  # (B, z_dim) posterior mean
    logvar: torch.Tensor  # (B, z_dim) posterior log-variance
    loss: torch.Tensor  # () recon_loss + kl_loss, what training minimises
    recon_loss: torch.Tensor  # () squared error summed over pixels, mean over the batch
    kl_loss: torch.Tensor  # () floored KL, mean over the batch


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        chans = (config.channels, *config.widths)
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=4, stride=2) for c_in, c_out in zip(chans, chans[1:])
        )
        self.mu = nn.Linear(config.flat_size, config.z_dim)
        self.logvar = nn.Linear(config.flat_size, config.z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, 3, 64, 64)
        for conv in self.convs:
            x = F.relu(conv(x))  # (B, 32, 31, 31) (B, 64, 14, 14) (B, 128, 6, 6) (B, 256, 2, 2)
        # flatten in (C, H, W) order whatever the memory format, so weights are portable
        x = x.reshape(x.size(0), -1)  # (B, 1024)
        return self.mu(x), self.logvar(x)  # (B, z_dim) each


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        chans = (config.flat_size, *reversed(config.widths[:-1]), config.channels)
        self.fc = nn.Linear(config.z_dim, config.flat_size)
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, kernel_size=k, stride=2)
            for c_in, c_out, k in zip(chans, chans[1:], config.decoder_kernels())
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z)  # (B, 1024), read as a (B, 1024, 1, 1) map
        # A transposed conv of a 1x1 map is a plain matrix product with the same weights and
        # result; as a matmul it runs about 4x faster on CPU than the conv kernel does. The weight
        # (in, out, kh, kw) is read in its channels_last memory order (in, kh, kw, out), so neither
        # it nor the output (channels_last, as the next conv wants it) is copied.
        first = self.deconvs[0]
        w = first.weight.permute(0, 2, 3, 1).flatten(1)  # (1024, 5 * 5 * 128)
        x = (h @ w).view(z.size(0), *first.kernel_size, first.out_channels)  # (B, 5, 5, 128)
        x = x.permute(0, 3, 1, 2) + first.bias.view(1, -1, 1, 1)  # (B, 128, 5, 5)
        for deconv in self.deconvs[1:]:
            x = deconv(F.relu(x))  # (B, 64, 13, 13) (B, 32, 30, 30) (B, 3, 64, 64)
        return torch.sigmoid(x)


class VAE(nn.Module):
    """Convolutional VAE: `encode` images to (mu, logvar), `decode` latents to images."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # channels_last: the convs' fastest layout on CPU (oneDNN) and on recent GPUs, and the
        # layout `images_to_float` produces from stored frames without a copy.
        self.to(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of images `x` (B, C, H, W) in [0, 1]: mu and logvar, each (B, z_dim)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] from latents `z` (B, z_dim)."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A sample z = mu + sigma * eps of the posterior, differentiable in mu and logvar."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """`n` images (n, C, H, W) decoded from z ~ N(0, temperature^2 I), the prior."""
        device = self.decoder.fc.weight.device
        z = torch.randn(n, self.config.z_dim, generator=generator, device=device) * temperature
        return self.decode(z)

    def loss(
        self, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """World Models' loss of a batch: (total, reconstruction, floored KL), each a scalar.

        reconstruction = sum over pixels of (x - recon)^2, averaged over the batch (the bottom
                         `bottom_rows` rows weighted by `bottom_weight`)
        KL             = max(KL(N(mu, sigma^2) || N(0, I)), kl_tolerance * z_dim) per image,
                         averaged over the batch
        """
        # In float32 even under bf16 autocast: a sum of 12,288 squared errors needs the precision.
        x, recon, mu, logvar = x.float(), recon.float(), mu.float(), logvar.float()
        err = (x - recon).pow(2)  # (B, C, H, W)
        if self.config.bottom_rows and self.config.bottom_weight != 1.0:
            err = err.clone()
            err[..., -self.config.bottom_rows :, :] *= self.config.bottom_weight
        recon_loss = err.flatten(1).sum(1).mean()
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)  # (B,) nats per image
        kl_loss = kl.clamp(min=self.config.kl_tolerance * self.config.z_dim).mean()
        return recon_loss + kl_loss, recon_loss, kl_loss

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        """Encode, sample z from the posterior, decode, and compute the loss terms."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)
        recon = self.decode(z)
        loss, recon_loss, kl_loss = self.loss(x, recon, mu, logvar)
        return VAEOutput(recon, mu, logvar, loss, recon_loss, kl_loss)


# ----------------------------------------------------------------------------------------------
# image layout helpers


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1], channels_last in memory (no copy
    beyond the dtype conversion: the permuted view already has channels_last strides)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        shape = tuple(images.shape)
        raise ValueError(f"expected uint8 (B, H, W, C) images, got {images.dtype} {shape}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, C, H, W) in [0, 1] -> uint8 (B, H, W, C), rounded and clamped."""
    return (x.detach().float().clamp(0, 1) * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1)
