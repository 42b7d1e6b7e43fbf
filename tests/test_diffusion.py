"""DDPM / DDIM (gen_core.diffusion): U-Net shapes, schedules, q_sample, samplers against
independent computations, EMA."""

import math

import pytest
import torch

from gen_core.diffusion import (
    Diffusion,
    DiffusionConfig,
    SelfAttention,
    UNet,
    cosine_betas,
    linear_betas,
)


def tiny(timesteps: int = 20, schedule: str = "linear", image_size: int = 8) -> Diffusion:
    torch.manual_seed(0)
    cfg = DiffusionConfig(
        image_size=image_size, width=8, mults=(1, 2), attn_resolutions=(4,),
        timesteps=timesteps, schedule=schedule,
    )  # fmt: skip
    model = Diffusion(cfg)
    # the output conv starts at zero (eps = 0); random weights make the samplers' tests bite
    with torch.no_grad():
        for net in (model.unet, model.ema):
            net.conv_out.weight.normal_(0, 0.1)
            net.conv_out.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    "image_size, mults, attn",
    [(16, (1, 2), (8,)), (32, (1, 2, 2), (8,)), (64, (1, 2, 2, 2), (16,))],
)
def test_unet_shapes(image_size, mults, attn):
    cfg = DiffusionConfig(image_size=image_size, width=8, mults=mults, attn_resolutions=attn)
    unet = UNet(cfg)
    x = torch.randn(2, 3, image_size, image_size)
    assert unet(x, torch.tensor([0, 999])).shape == x.shape
    # attention where asked (once per matching res block down and up) plus the middle one
    n_attn = sum(isinstance(m, SelfAttention) for m in unet.modules())
    assert n_attn == 1 * 1 + 2 * 1 + 1  # 1 res block down, 2 up at the attention level, middle


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        DiffusionConfig(image_size=20, mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="quadratic")


def test_schedules():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # cosine: abar_t = f(t + 1) / f(0) with f(t) = cos^2((t / T + s) / (1 + s) pi / 2)
    t_max, s = 1000, 0.008
    abar = torch.cumprod(1 - cosine_betas(t_max), 0)
    f = lambda t: math.cos((t / t_max + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(t_max).max().item() <= 0.999
    d = Diffusion(DiffusionConfig(image_size=8, width=8, mults=(1,), attn_resolutions=()))
    assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()
    assert d.alphas_cumprod[-1].item() < 1e-4  # x_T is (almost) pure noise
    assert d.ddim_timesteps(50)[0] == 0 and d.ddim_timesteps(50)[-1] == 999
    assert len(d.ddim_timesteps(50)) == 50 and d.ddim_timesteps(1000) == list(range(1000))


def test_q_sample_matches_the_closed_form():
    model = tiny(timesteps=50)
    x0 = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 37])
    betas = [1e-4 * 20 + (0.02 * 20 - 1e-4 * 20) * k / 49 for k in range(50)]  # T = 50 scaling
    for i, ti in enumerate(t.tolist()):
        abar = math.prod(1 - b for b in betas[: ti + 1])
        expected = math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i]
        assert torch.allclose(model.q_sample(x0, t, noise)[i], expected, atol=1e-6)


def test_q_sample_is_the_distribution_of_the_noising_chain():
    """Running x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps step by step from a fixed x_0
    gives the mean and standard deviation of the closed form q(x_t | x_0)."""
    model = tiny(timesteps=50)
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([-0.8, 0.0, 0.5, 1.0])
    x = x0.expand(40_000, 4).clone()
    for t in range(30):
        beta = model.betas[t].float()
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g)
    closed = model.q_sample(
        x0.view(1, 1, 1, 4).expand(40_000, 1, 1, 4),
        torch.full((40_000,), 29),
        torch.randn(40_000, 1, 1, 4, generator=g),
    ).view(40_000, 4)
    assert torch.allclose(x.mean(0), closed.mean(0), atol=0.02)
    assert torch.allclose(x.std(0), closed.std(0), atol=0.02)


def test_ddim_with_every_step_is_the_deterministic_reverse_ode():
    """DDIM (eta = 0, all T steps) against Song et al.'s eq. 14 written out step by step:
    x_{t-1} / sqrt(abar_{t-1}) = x_t / sqrt(abar_t)
        + (sqrt((1 - abar_{t-1}) / abar_{t-1}) - sqrt((1 - abar_t) / abar_t)) eps(x_t, t)."""
    model = tiny(timesteps=20)
    out = model.sample_ddim(3, steps=20, eta=0.0, generator=torch.Generator().manual_seed(5),
                            clip=False)  # fmt: skip
    abar = torch.cumprod(1 - model.betas, 0).tolist()  # float64
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in reversed(range(20)):
            eps = model.ema(x, torch.full((3,), t))
            a_t, a_prev = abar[t], abar[t - 1] if t > 0 else 1.0
            ratio = math.sqrt((1 - a_prev) / a_prev) - math.sqrt((1 - a_t) / a_t)
            x = math.sqrt(a_prev) * (x / math.sqrt(a_t) + ratio * eps)
    assert torch.allclose(out, ((x + 1) / 2).clamp(0, 1), atol=1e-5)
    # deterministic: another call with the same x_T gives the same images
    again = model.sample_ddim(3, 20, 0.0, torch.Generator().manual_seed(5), clip=False)
    assert torch.equal(out, again)


def test_ddim_with_eta_one_and_every_step_is_ancestral_ddpm():
    model = tiny(timesteps=20)
    ddpm = model.sample_ddpm(2, generator=torch.Generator().manual_seed(3))
    ddim = model.sample_ddim(2, 20, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ddpm, ddim, atol=1e-5)
    assert model.sample(2, torch.Generator().manual_seed(3), steps=20, eta=1.0).equal(ddpm)


def test_samplers_recover_the_data_with_the_ideal_noise_predictor():
    """For a data set of one image x*, the best eps(x_t, t) is (x_t - sqrt(abar_t) x*) /
    sqrt(1 - abar_t); with it every sampler must land exactly on x*."""
    model = tiny(timesteps=50)
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    class Ideal(torch.nn.Module):
        def forward(self, x, t):
            abar = model.alphas_cumprod[t].float()[:, None, None, None]
            return (x - abar.sqrt() * target) / (1 - abar).sqrt()

    model.ema = Ideal()
    expected = ((target + 1) / 2).expand(3, -1, -1, -1)
    for images in (
        model.sample_ddpm(3, torch.Generator().manual_seed(1)),
        model.sample_ddim(3, 10, 0.0, torch.Generator().manual_seed(1)),
        model.sample_ddim(3, 7, 0.5, torch.Generator().manual_seed(1)),
    ):
        assert torch.allclose(images, expected, atol=1e-5)


def test_samples_are_images_and_reproducible_for_a_seed():
    model = tiny(timesteps=20, schedule="cosine")
    a = model.sample(4, torch.Generator().manual_seed(0), steps=5)
    b = model.sample(4, torch.Generator().manual_seed(0), steps=5)
    c = model.sample(4, torch.Generator().manual_seed(1), steps=5)
    assert a.shape == (4, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    e = model.sample(2, torch.Generator().manual_seed(0), steps=5, eta=0.5)
    assert torch.equal(e, model.sample(2, torch.Generator().manual_seed(0), steps=5, eta=0.5))


def test_loss_and_ema():
    model = tiny(timesteps=20)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = model.loss(x0, torch.Generator().manual_seed(0))
    assert loss.shape == () and loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in model.ema.parameters())  # the EMA is never trained
    ema_before = [p.clone() for p in model.ema.parameters()]
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)
    model.update_ema(0.9)
    for e0, e, p in zip(ema_before, model.ema.parameters(), model.unet.parameters()):
        assert torch.allclose(e, 0.9 * e0 + 0.1 * p, atol=1e-6)
    # early on, the cap (1 + step) / (10 + step) wins over the configured decay
    ema_before = [p.clone() for p in model.ema.parameters()]
    model.update_ema(0.9999, step=0)
    for e0, e, p in zip(ema_before, model.ema.parameters(), model.unet.parameters()):
        assert torch.allclose(e, 0.1 * e0 + 0.9 * p, atol=1e-6)
    # the schedule is derived from the config, so only the weights are saved
    keys = model.state_dict().keys()
    assert not any("alphas" in k or "betas" in k for k in keys)
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("unet.") for k in keys)


# ----------------------------------------------------------------------------------------------
# v-prediction, min-SNR weighting


def test_v_prediction_target_and_its_inversion():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022); from v and x_t the sampler
    recovers x0 = sqrt(abar) x_t - sqrt(1 - abar) v and eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=8, width=8, mults=(1,), attn_resolutions=(), timesteps=50,
                          prediction="v")  # fmt: skip
    model = Diffusion(cfg)
    x0, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 20, 49])
    v = model.target(x0, t, noise)
    abar = model.alphas_cumprod[t].float()[:, None, None, None]
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    x_t = model.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        oracle = lambda x, ts, i=i: v[i : i + 1]  # noqa: E731
        eps, x0_pred = model._predict_x0(oracle, x_t[i : i + 1], ti, False)
        assert torch.allclose(x0_pred, x0[i : i + 1], atol=1e-4)
        assert torch.allclose(eps, noise[i : i + 1], atol=1e-4)
    # an eps model's target is the noise itself
    assert torch.equal(tiny().target(x0, t, noise), noise)


def test_samplers_recover_the_data_with_the_ideal_v_predictor():
    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=8, width=8, mults=(1,), attn_resolutions=(), timesteps=50,
                          schedule="cosine", prediction="v")  # fmt: skip
    model = Diffusion(cfg)
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    class Ideal(torch.nn.Module):
        def forward(self, x, t):
            abar = model.alphas_cumprod[t].float()[:, None, None, None]
            eps = (x - abar.sqrt() * target) / (1 - abar).sqrt()
            return abar.sqrt() * eps - (1 - abar).sqrt() * target

    model.ema = Ideal()
    expected = ((target + 1) / 2).expand(3, -1, -1, -1)
    for images in (
        model.sample_ddpm(3, torch.Generator().manual_seed(1)),
        model.sample_ddim(3, 10, 0.0, torch.Generator().manual_seed(1)),
    ):
        assert torch.allclose(images, expected, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting(prediction):
    """Weights are min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v), and the loss
    is the per-sample mean squared error weighted by them."""
    cfg = DiffusionConfig(image_size=8, width=8, mults=(1,), attn_resolutions=(), timesteps=100,
                          schedule="cosine", prediction=prediction, weighting="min-snr",
                          min_snr_gamma=5.0)  # fmt: skip
    torch.manual_seed(0)
    model = Diffusion(cfg)
    t = torch.arange(100)
    abar = model.alphas_cumprod.tolist()
    for ti, w in zip(t.tolist(), model.loss_weight(t).tolist()):
        snr = abar[ti] / (1 - abar[ti])
        expected = min(snr, 5.0) / (snr if prediction == "eps" else snr + 1)
        assert w == pytest.approx(expected, rel=1e-5)
    # nearly noise-free steps (SNR >> gamma) weigh less than with no weighting, noisy ones 1
    w = model.loss_weight(torch.tensor([0, 99]))
    assert w[0] < 0.1 and (w[1] == pytest.approx(1.0) if prediction == "eps" else w[1] <= 1)
    # the loss by hand, with the same draws of t and noise
    with torch.no_grad():
        model.unet.conv_out.weight.normal_(0, 0.1)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(3)
    ts = torch.randint(0, 100, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    err = (model.unet(model.q_sample(x0, ts, noise), ts) - model.target(x0, ts, noise)).pow(2)
    by_hand = (model.loss_weight(ts) * err.flatten(1).mean(1)).mean()
    assert model.loss(x0, torch.Generator().manual_seed(3)).item() == pytest.approx(
        by_hand.item(), rel=1e-5
    )


def test_bad_process_settings():
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="x0")
    with pytest.raises(ValueError, match="weighting"):
        DiffusionConfig(weighting="p2")


# ----------------------------------------------------------------------------------------------
# latent diffusion


def test_residual_mlp_denoiser():
    from gen_core.latent_diffusion import LatentDiffusionConfig, ResMLP

    torch.manual_seed(0)
    net = ResMLP(LatentDiffusionConfig(z_dim=6, width=16, depth=2))
    z, t = torch.randn(5, 6), torch.tensor([0, 1, 10, 500, 999])
    assert torch.equal(net(z, t), torch.zeros(5, 6))  # zero-initialised output: eps = 0
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    out = net(z, t)
    assert out.shape == (5, 6) and torch.isfinite(out).all()
    # the timestep matters, and each sample is denoised on its own (no mixing across the batch)
    assert not torch.allclose(net(z, torch.zeros(5, dtype=torch.long)), out)
    assert torch.allclose(net(z[2:3], t[2:3]), out[2:3], atol=1e-6)


def test_latent_diffusion_learns_a_shifted_mixture():
    """Latents far from N(0, I) (dimension 0: two modes at 1 and 5, dimension 1: mean 3, std
    2) are standardised for training and mapped back in `sample`; a few hundred steps lower the
    loss and give both modes, the right mean and the right spread."""
    from gen_core.latent_diffusion import LatentDiffusion, LatentDiffusionConfig

    torch.manual_seed(0)
    cfg = LatentDiffusionConfig(z_dim=2, width=32, depth=2, timesteps=100)
    model = LatentDiffusion(cfg)
    modes = torch.randint(0, 2, (4096,)).float() * 4 + 1  # 1 or 5
    data = torch.stack([modes + 0.2 * torch.randn(4096), 3 + 2 * torch.randn(4096)], dim=1)
    model.set_latent_stats(data)
    opt = torch.optim.Adam(model.net.parameters(), lr=2e-3)
    losses = []
    for step in range(400):
        loss = model.loss(data[torch.randint(0, 4096, (128,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_ema(0.99, step)
        losses.append(loss.item())
    assert sum(losses[-50:]) < 0.95 * sum(losses[:50])  # v of the Gaussian part is noise
    z = model.sample(2000, torch.Generator().manual_seed(0), steps=20)
    assert z.shape == (2000, 2)
    near = ((z[:, 0] - 1).abs() < 0.8) | ((z[:, 0] - 5).abs() < 0.8)
    assert near.float().mean() > 0.85  # samples sit on the modes, not between them
    assert 0.3 < (z[:, 0] < 3).float().mean() < 0.7  # and both modes are drawn
    assert z[:, 1].mean().item() == pytest.approx(3.0, abs=0.3)
    assert z[:, 1].std().item() == pytest.approx(2.0, rel=0.2)
    keys = model.state_dict().keys()
    assert "latent_mean" in keys and any(k.startswith("denoiser.") for k in keys)
