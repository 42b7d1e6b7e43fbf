"""DCGAN and WGAN-GP (gen_core.gan): shapes, the gradient penalty by hand, sampling."""

import pytest
import torch
from torch import nn

from gen_core.gan import GAN, GANConfig, gradient_penalty


def tiny(loss: str = "dcgan", image_size: int = 16, **kw) -> GAN:
    torch.manual_seed(0)
    return GAN(GANConfig(image_size=image_size, z_dim=8, g_width=4, d_width=4, loss=loss, **kw))


@pytest.mark.parametrize("loss", ["dcgan", "wgan-gp"])
@pytest.mark.parametrize("image_size", [8, 32, 64])
def test_shapes_and_ranges(loss, image_size):
    gan = tiny(loss, image_size)
    z = gan.noise(3)
    assert z.shape == (3, 8)
    fake = gan.generator(z)
    assert fake.shape == (3, 3, image_size, image_size)
    assert fake.min() >= -1 and fake.max() <= 1  # tanh
    assert gan.discriminator(fake).shape == (3,)
    images = gan.eval().sample(5)
    assert images.shape == (5, 3, image_size, image_size)
    assert images.min() >= 0 and images.max() <= 1


def test_64x64_layout_is_dcgans():
    gan = GAN(GANConfig())  # 64x64, z 100, widths 64
    g_convs = [m for m in gan.generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    d_convs = [m for m in gan.discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in g_convs] == [512, 256, 128, 64, 3]
    assert [m.out_channels for m in d_convs] == [64, 128, 256, 512, 1]
    assert g_convs[0].in_channels == 100
    # batch norm in DCGAN's discriminator (not on its first layer), none in WGAN-GP's critic
    d_bn = [m for m in gan.discriminator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(d_bn) == 3
    critic = GAN(GANConfig(loss="wgan-gp")).discriminator
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    assert GANConfig().optimizer_defaults() == {"lr": 2e-4, "betas": (0.5, 0.999)}
    assert GANConfig(loss="wgan-gp").optimizer_defaults() == {"lr": 1e-4, "betas": (0.0, 0.9)}


def test_bad_configs():
    with pytest.raises(ValueError, match="power of two"):
        GANConfig(image_size=48)
    with pytest.raises(ValueError, match="loss"):
        GANConfig(loss="lsgan")


class LinearCritic(nn.Module):
    """f(x) = <w, x> + b: its gradient is w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (x.flatten(1) * self.w.flatten()).sum(1) + 0.3


def test_gradient_penalty_of_a_linear_critic_by_hand():
    w = torch.tensor([[[[3.0, 0.0], [0.0, 4.0]]]])  # ||w|| = 5
    critic = LinearCritic(w)
    real, fake = torch.rand(4, 1, 2, 2), torch.rand(4, 1, 2, 2)
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)  # the same for every interpolate
    # create_graph: the penalty trains the critic; d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    gp.backward()
    assert torch.allclose(critic.w.grad, 2 * (5.0 - 1.0) * w / 5.0)


def test_gradient_penalty_interpolates_as_documented():
    """f(x) = ||x||^2 / 2 has gradient x, so the penalty reveals where x_hat was taken:
    with real = 1 and fake = 0 over 4 pixels, x_hat = eps and ||grad|| = 2 eps."""
    critic = lambda x: 0.5 * x.flatten(1).pow(2).sum(1)  # noqa: E731
    real, fake = torch.ones(6, 1, 2, 2), torch.zeros(6, 1, 2, 2)
    gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(3))
    eps = torch.rand(6, 1, 1, 1, generator=torch.Generator().manual_seed(3)).flatten()
    assert gp.item() == pytest.approx((2 * eps - 1).pow(2).mean().item(), rel=1e-6)


def test_losses():
    gan = tiny("dcgan")
    real = torch.rand(6, 3, 16, 16) * 2 - 1
    fake = gan.generator(gan.noise(6))
    d_loss, figures = gan.discriminator_loss(real, fake)
    # at initialisation D outputs ~0 logits: BCE ~ 2 ln 2 for D, ln 2 for G
    assert d_loss.item() == pytest.approx(2 * 0.6931, abs=0.2)
    assert gan.generator_loss(fake).item() == pytest.approx(0.6931, abs=0.1)
    assert set(figures) == {"d_loss", "d_real"}
    # the discriminator's loss never sends gradients into the generator
    d_loss.backward()
    assert all(p.grad is None for p in gan.generator.parameters())

    wgan = tiny("wgan-gp")
    fake = wgan.generator(wgan.noise(6))
    d_loss, figures = wgan.discriminator_loss(real, fake, torch.Generator().manual_seed(0))
    d_real, d_fake = wgan.discriminator(real), wgan.discriminator(fake)
    gp = gradient_penalty(wgan.discriminator, real, fake, torch.Generator().manual_seed(0))
    expected = d_fake.mean() - d_real.mean() + 10.0 * gp
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert wgan.generator_loss(fake).item() == pytest.approx(-d_fake.mean().item(), rel=1e-5)


def test_sampling_is_reproducible_for_a_seed():
    gan = tiny("dcgan").eval()
    a = gan.sample(4, torch.Generator().manual_seed(7))
    b = gan.sample(4, torch.Generator().manual_seed(7))
    c = gan.sample(4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
