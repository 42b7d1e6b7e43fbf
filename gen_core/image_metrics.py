"""Offline image-generation metrics: a Fréchet distance in a feature space the toolkit trains
itself, and a nearest-neighbour memorisation check. Nothing is downloaded.

Fréchet distance (FD). FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium") fits a Gaussian to the features of real and of generated
images and reports the Fréchet (2-Wasserstein) distance between the two Gaussians,

    FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).

FID's features come from an ImageNet Inception network, which needs downloaded weights and was
never trained on game frames. Here the feature extractor is `FeatureNet`, a small deterministic
convolutional autoencoder trained by the toolkit on the training frames of the same data set
(`train_feature_net`) and saved as a checkpoint. Why this one:

* It is trained on the data, so its features describe what varies in these frames (track
  layout, grass texture, the car), not ImageNet classes.
* It is none of the models being judged. The World Models VAE's encoder mean would be a natural
  choice, but then the VAE would be measured in its own latent space (favouring it), and that
  space is shaped by a KL term that throws away detail the other models are judged on.
* It is deterministic (no sampling, no batch norm, no dropout) and loaded from a checkpoint, so
  an FD value depends only on the images and the checkpoint: compare FDs only when they were
  computed with the same feature checkpoint and the same numbers of images (FD is biased
  upwards for small sets, so the reference FDs must use the same counts).

The feature vector of an image is its autoencoder code (global layout) concatenated with the
spatial means of the first three encoder layers' activations (colour and texture statistics at
three scales), so that both a wrong layout and wrong local texture (e.g. leftover noise) move it.
Each dimension is then standardised by the mean and standard deviation it has over training
frames (stored in the checkpoint with the weights). Without that, FD is a weighted sum with
weights set by accident: on CarRacing the code dimensions vary ~15x more than the pooled ones,
so the texture half counted ~200x less and a DDPM's leftover noise barely moved FD. Dimensions
that are constant on real frames (dead ReLU channels) are dropped.

Against what. FD "to held-out frames" is what generalisation asks for, but a held-out set of a
few episodes covers only a few tracks: its Gaussian is narrower than the data's, real training
frames themselves sit far from it, and a blurry model that averages tracks can score below
them. FID's usual practice compares with the training set; copying is what makes that unsafe,
and the memorisation check below is there to catch it. So both are reported, each with the
same comparison made between real frames as its floor.

Memorisation. For each generated image, the pixel-space L2 distance to its nearest training
image; the same for held-out real images (frames the generator never saw). `nn_ratio` is
median(sample -> train) / median(held-out -> train): about 1 or above when samples are as far
from the training set as new real frames are, far below 1 when the model reproduces training
images. Above 1 says nothing about quality (blurry or broken samples are far from everything);
read it together with FD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class FeatureConfig:
    image_size: int = 64  # images are image_size x image_size
    channels: int = 3  # colour channels of the images
    widths: tuple[int, ...] = (16, 32, 64, 64)  # encoder conv channels (stride 2 each)
    code_dim: int = 64  # size of the autoencoder code, part of the feature vector

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) < 3:
            raise ValueError("widths: expected at least three conv layers")
        if self.image_size % 2 ** len(self.widths) or self.image_size < 2 ** len(self.widths):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^{len(self.widths)}"
            )

    @property
    def final_size(self) -> int:
        return self.image_size // 2 ** len(self.widths)  # 64 -> 4

    @property
    def feature_dim(self) -> int:
        """code_dim + the first three widths (64 + 16 + 32 + 64 = 176 by default)."""
        return self.code_dim + sum(self.widths[:3])


class FeatureNet(nn.Module):
    """A deterministic conv autoencoder whose encoder gives FD's feature vectors."""

    def __init__(self, config: FeatureConfig):
        super().__init__()
        self.config = config
        # per-dimension standardisation, set by `fit_standardisation` (std inf: dimension dropped)
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))
        chans = (config.channels, *config.widths)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans, chans[1:])
        )
        flat = config.widths[-1] * config.final_size**2
        self.to_code = nn.Linear(flat, config.code_dim)
        self.from_code = nn.Linear(config.code_dim, flat)
        back = (*reversed(config.widths), config.channels)
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(a, b, 4, stride=2, padding=1) for a, b in zip(back, back[1:])
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # x: (B, 3, 64, 64) in [0, 1]
        acts = []
        h = x * 2 - 1  # centred inputs train faster
        for conv in self.convs:
            h = F.relu(conv(h))  # (B, 16, 32, 32) (B, 32, 16, 16) (B, 64, 8, 8) (B, 64, 4, 4)
            acts.append(h)
        code = self.to_code(h.reshape(h.size(0), -1))  # (B, code_dim)
        return code, acts

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        s, w = self.config.final_size, self.config.widths[-1]
        h = self.from_code(code).view(code.size(0), w, s, s)  # (B, 64, 4, 4)
        for i, deconv in enumerate(self.deconvs):
            h = deconv(h if i == 0 else F.relu(h))  # ... -> (B, 3, 64, 64)
        return torch.sigmoid(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x` (B, C, H, W) in [0, 1]; training minimises its MSE."""
        code, _ = self.encode(x)
        return self.decode(code)

    @torch.no_grad()
    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unstandardised features (B, feature_dim) of images (B, C, H, W) in [0, 1]."""
        code, acts = self.encode(x)
        pooled = [a.mean(dim=(2, 3)) for a in acts[:3]]  # (B, 16) (B, 32) (B, 64)
        return torch.cat([code, *pooled], dim=1)  # (B, 176)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """FD's feature vectors (B, feature_dim) of images (B, C, H, W) in [0, 1]: each
        dimension standardised over training frames, dead ones 0."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def fit_standardisation(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """Set the per-dimension mean and std from real images (N, C, H, W) in [0, 1]."""
        raw = torch.cat(
            [
                self.raw_features(images[i : i + batch_size])
                for i in range(0, len(images), batch_size)
            ]
        ).double()  # (N, D)
        std = raw.std(0)
        dead = std < 1e-6 * std.max()  # constant on real frames: carries nothing
        self.feature_mean.copy_(raw.mean(0))
        self.feature_std.copy_(torch.where(dead, torch.full_like(std, float("inf")), std))


def train_feature_net(
    batches,
    config: FeatureConfig,
    standardise_on: torch.Tensor,
    steps: int = 600,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[FeatureNet, float]:
    """Train a FeatureNet for `steps` Adam steps on `batches`, an iterator of float image
    batches (B, C, H, W) in [0, 1], then fit its standardisation on `standardise_on` (real
    images (N, C, H, W) in [0, 1] spread over the whole training set); returns the network in
    eval mode and its last reconstruction MSE."""
    torch.manual_seed(seed)
    net = FeatureNet(config).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = next(batches).to(device)
        loss = F.mse_loss(net(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    net.fit_standardisation(standardise_on.to(device))
    return net, loss.item()


@torch.no_grad()
def compute_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features (N, D) float64 of float images (N, C, H, W) in [0, 1], in batches."""
    device = next(net.parameters()).device
    out = [
        net.features(images[i : i + batch_size].to(device)).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(len(f) - 1, 1)


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians, in float64.

    Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2; unlike
    a general matrix square root this needs no scipy and stays real.
    """
    mu1, mu2, cov1, cov2 = mu1.double(), mu2.double(), cov1.double(), cov2.double()
    w, v = _eigh(cov1)
    sqrt1 = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^(1/2)
    inner = sqrt1 @ cov2 @ sqrt1
    eig = _eigh((inner + inner.T) / 2)[0].clamp(min=0)
    tr_sqrt = eig.sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return max(float(fd), 0.0)


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh, retried with a tiny ridge when LAPACK fails to converge on a singular matrix (as
    the FID reference code offsets the covariances); the ridge moves FD by ~1e-9 of its trace."""
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        ridge = 1e-9 * max(m.diagonal().abs().mean().item(), 1e-12)
        return torch.linalg.eigh(m + ridge * torch.eye(len(m), dtype=m.dtype))


def fd_of_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to feature sets a (N, D), b (M, D)."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


@torch.no_grad()
def nearest_distances(
    queries: torch.Tensor, references: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """For each query image, the L2 distance to its nearest reference image, (Nq,) float32.

    Images are (N, C, H, W) float in [0, 1] (or uint8 (N, H, W, C), converted per chunk); the
    references are walked in chunks so that a large training set never has to be held as
    floats all at once. The nearest reference is found with cdist's fast matrix-product form,
    whose cancellation error (~1e-3 here) would hide an exact copy; the distance to the one
    found is then recomputed directly, so a copy measures 0.
    """
    q = _flat_float(queries)  # (Nq, D)
    best = torch.full((len(q),), float("inf"))
    for i in range(0, len(references), chunk):
        r = _flat_float(references[i : i + chunk])  # (chunk, D)
        nearest = torch.cdist(q, r).argmin(dim=1)  # (Nq,)
        exact = (q - r[nearest]).norm(dim=1)  # (Nq,)
        best = torch.minimum(best, exact)
    return best


def _flat_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:  # (N, H, W, C) stored frames
        images = images.permute(0, 3, 1, 2).float() / 255.0
    return images.float().reshape(len(images), -1).cpu()


def memorisation(
    samples: torch.Tensor, held_out: torch.Tensor, train: torch.Tensor
) -> dict[str, float]:
    """Nearest-training-image distances of samples vs held-out real images (see module doc).

    Returns nn_ratio = median(sample -> train) / median(held-out -> train), both medians, and
    the fraction of samples nearer to a training image than the closest held-out image is
    (a copy detector: near 0 for a model that does not copy).
    """
    d_samples = nearest_distances(samples, train)
    d_real = nearest_distances(held_out, train)
    med_s, med_r = d_samples.median().item(), d_real.median().item()
    return {
        "nn_ratio": med_s / max(med_r, 1e-12),
        "nn_train_median_samples": med_s,
        "nn_train_median_held_out": med_r,
        "frac_samples_closer_than_any_held_out": (d_samples < d_real.min()).float().mean().item(),
    }
