import math

import pytest
import torch

from gen_core.mdnrnn import MDNRNN, MDNRNNConfig, mixture_nll, sample_mixture


def small(**kw):
    return MDNRNN(MDNRNNConfig(z_dim=4, action_dim=2, hidden=16, n_mixtures=3, **kw))


def test_shapes():
    m = small()
    z, a = torch.randn(5, 7, 4), torch.randn(5, 7, 2)
    out = m(z, a)
    assert out.logit_pi.shape == out.mu.shape == out.log_sigma.shape == (5, 7, 4, 3)
    assert out.reward.shape == out.done_logit.shape == (5, 7)
    assert out.hidden.shape == (5, 7, 16)
    assert out.state[0].shape == out.state[1].shape == (1, 5, 16)
    assert m.sample(out).shape == (5, 7, 4)
    terms = m.loss(out, torch.randn(5, 7, 4), torch.randn(5, 7), torch.zeros(5, 7))
    assert set(terms) == {"loss", "nll", "reward_mse", "done_bce"}
    no_heads = small(reward_head=False, done_head=False)
    out = no_heads(z, a)
    assert out.reward is None and out.done_logit is None
    assert set(no_heads.loss(out, torch.randn(5, 7, 4))) == {"loss", "nll"}


def test_mixture_nll_matches_hand_computation():
    logit_pi = torch.tensor([[0.0, math.log(3.0)]])  # pi = (0.25, 0.75)
    mu = torch.tensor([[0.0, 2.0]])
    log_sigma = torch.tensor([[0.0, math.log(0.5)]])
    x = torch.tensor([1.0])

    def normal(x, m, s):
        return math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    expected = -math.log(0.25 * normal(1.0, 0.0, 1.0) + 0.75 * normal(1.0, 2.0, 0.5))
    got = mixture_nll(logit_pi, mu, log_sigma, x)
    assert torch.allclose(got, torch.tensor([expected]), atol=1e-6)


def test_joint_mixture_shapes_and_nll_match_hand_computation():
    m = small(joint_mixture=True)
    out = m(torch.randn(5, 7, 4), torch.randn(5, 7, 2))
    assert out.logit_pi.shape == (5, 7, 1, 3)  # one set of weights for all of z
    assert out.mu.shape == out.log_sigma.shape == (5, 7, 4, 3)
    assert m.sample(out).shape == (5, 7, 4)
    # The same per-dimension weights the factored model's linear layer would give it, minus D-1.
    factored = small()
    assert sum(p.numel() for p in factored.parameters()) - sum(
        p.numel() for p in m.parameters()
    ) == (4 - 1) * 3 * (16 + 1)

    # -log sum_k pi_k prod_d N(x_d | mu_dk, sigma_dk), shared out over the D = 2 dimensions.
    logit_pi = torch.tensor([[[0.0, math.log(3.0)]]])  # (1, 1, K=2): pi = (0.25, 0.75)
    mu = torch.tensor([[[0.0, 2.0], [1.0, -1.0]]])  # (1, D=2, K=2)
    log_sigma = torch.tensor([[[0.0, math.log(0.5)], [math.log(2.0), 0.0]]])
    x = torch.tensor([[1.0, 0.5]])

    def normal(x, m, s):
        return math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    joint = -math.log(
        0.25 * normal(1.0, 0.0, 1.0) * normal(0.5, 1.0, 2.0)
        + 0.75 * normal(1.0, 2.0, 0.5) * normal(0.5, -1.0, 1.0)
    )
    got = mixture_nll(logit_pi, mu, log_sigma, x)  # (1, 2)
    assert got.shape == (1, 2)
    assert torch.allclose(got.sum(-1), torch.tensor([joint]), atol=1e-6)
    assert torch.allclose(got[:, 0], got[:, 1])


def test_joint_mixture_draws_one_component_for_every_dimension():
    # Two modes: all of z near -5, or all near +5. Per-dimension picks mix them half the time.
    n, D = 4000, 6
    mu = torch.tensor([-5.0, 5.0]).expand(n, D, 2)
    log_sigma = torch.full((n, D, 2), math.log(0.1))
    g = torch.Generator().manual_seed(0)
    joint = sample_mixture(torch.zeros(n, 1, 2), mu, log_sigma, 1.0, generator=g)  # (n, D)
    same_sign = (joint.sign() == joint[:, :1].sign()).all(dim=1).float().mean()
    assert same_sign == 1.0
    assert abs((joint[:, 0] > 0).float().mean().item() - 0.5) < 0.05  # both modes drawn
    factored = sample_mixture(torch.zeros(n, D, 2), mu, log_sigma, 1.0, generator=g)
    mixed = (factored.sign() == factored[:, :1].sign()).all(dim=1).float().mean()
    assert mixed < 0.1  # 2 / 2^6 expected
    assert torch.equal(
        sample_mixture(torch.tensor([[[0.0, 1.0]]]), mu[:1], log_sigma[:1], 0.0),
        torch.full((1, D), 5.0),
    )


def test_loss_weights_and_mask():
    m = small(reward_weight=2.0, done_weight=0.5)
    z, a = torch.randn(2, 3, 4), torch.randn(2, 3, 2)
    out = m(z, a)
    t = m.loss(out, torch.randn(2, 3, 4), torch.randn(2, 3), torch.ones(2, 3))
    assert torch.allclose(t["loss"], t["nll"] + 2.0 * t["reward_mse"] + 0.5 * t["done_bce"])
    # Masked-out steps do not count: changing their targets leaves the loss unchanged.
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    zn, r = torch.randn(2, 3, 4), torch.randn(2, 3)
    l1 = m.loss(out, zn, r, torch.zeros(2, 3), mask)["loss"]
    zn2, r2 = zn.clone(), r.clone()
    zn2[0, 2] += 100
    r2[1, 1:] -= 50
    l2 = m.loss(out, zn2, r2, torch.zeros(2, 3), mask)["loss"]
    assert torch.allclose(l1, l2)


def test_temperature_zero_gives_the_likely_mode_and_spread_grows():
    logit_pi = torch.tensor([[[2.0, 0.0]]]).expand(4000, 1, 2)  # mode 0 has pi ~ 0.88
    mu = torch.tensor([[[-3.0, 3.0]]]).expand(4000, 1, 2)
    log_sigma = torch.full((4000, 1, 2), math.log(0.5))
    g = torch.Generator().manual_seed(0)
    cold = sample_mixture(logit_pi, mu, log_sigma, 1e-4, generator=g)
    assert torch.allclose(cold, torch.full_like(cold, -3.0), atol=0.05)
    assert torch.equal(sample_mixture(logit_pi, mu, log_sigma, 0.0), torch.full((4000, 1), -3.0))
    spreads = [
        sample_mixture(logit_pi, mu, log_sigma, t, generator=g).std().item()
        for t in (0.1, 0.5, 1.0, 1.5)
    ]
    assert spreads == sorted(spreads) and spreads[-1] > 3 * spreads[0]


def test_stepwise_equals_whole_sequence():
    torch.manual_seed(0)
    m = small()
    z, a = torch.randn(3, 6, 4), torch.randn(3, 6, 2)
    full = m(z, a)
    state = m.initial_state(3)
    for t in range(6):
        out = m.step(z[:, t], a[:, t], state)
        state = out.state
        assert torch.allclose(out.mu[:, 0], full.mu[:, t], atol=1e-6)
        assert torch.allclose(out.reward[:, 0], full.reward[:, t], atol=1e-6)
    assert torch.allclose(state[0], full.state[0], atol=1e-6)


def test_step_is_differentiable_like_forward():
    """`step` (one LSTM cell call) gives forward's gradients, so it can still be trained through."""
    torch.manual_seed(0)
    m = small()
    z, a = torch.randn(3, 4), torch.randn(3, 2)

    def total(out):
        return out.mu.sum() + out.log_sigma.sum() + out.reward.sum() + out.done_logit.sum()

    total(m.step(z, a)).backward()
    by_step = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    total(m(z[:, None], a[:, None])).backward()
    for g1, p in zip(by_step, m.parameters()):
        assert torch.allclose(g1, p.grad, atol=1e-6)


def test_sample_mixture_draws_components_with_tempered_weights():
    # Far-apart components: which one a draw came from is plain from its value.
    logit_pi = torch.tensor([1.0, 0.0, -1.0]).expand(20000, 2, 3)
    mu = torch.tensor([-10.0, 0.0, 10.0]).expand(20000, 2, 3)
    log_sigma = torch.full((20000, 2, 3), math.log(0.1))
    g = torch.Generator().manual_seed(0)
    for tau in (0.5, 1.0, 2.0):
        x = sample_mixture(logit_pi, mu, log_sigma, tau, generator=g)  # (20000, 2)
        k = torch.bucketize(x, torch.tensor([-5.0, 5.0]))  # component of each draw
        freq = torch.bincount(k.flatten(), minlength=3).float() / k.numel()
        expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]) / tau, dim=0)
        assert torch.allclose(freq, expected, atol=0.01), (tau, freq, expected)
        spread = (x - (k - 1) * 10.0).std()  # around the picked mean: sigma sqrt(tau)
        assert abs(spread.item() - 0.1 * math.sqrt(tau)) < 0.005


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.3])
def test_stepper_equals_step_and_sample_mixture(heads, temperature, joint):
    """The fused rollout step is `MDNRNN.step` + `sample_mixture`, same generator draws."""
    torch.manual_seed(0)
    m = small(reward_head=heads, done_head=heads, joint_mixture=joint)
    fast = m.stepper()
    B = 5
    z, h, c = torch.randn(B, 4), torch.randn(B, 16), torch.randn(B, 16)
    g_ref, g_fast = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    zr, state = z, (h[None], c[None])
    with torch.no_grad():
        for _ in range(6):
            a = torch.randn(B, 2)
            ref = m.step(zr, a, state)
            zr, state = m.sample(ref, temperature, g_ref)[:, 0], ref.state
            h, c = fast.lstm(z, a, h, c)
            out = fast.heads(h)
            z = fast.sample(out, temperature, g_fast)
            assert torch.allclose(h, state[0][0], atol=1e-5)
            assert torch.allclose(c, state[1][0], atol=1e-5)
            assert torch.allclose(z, zr, atol=1e-5)
            if heads:
                assert torch.allclose(fast.reward(out), ref.reward[:, 0], atol=1e-5)
                assert torch.allclose(fast.done_logit(out), ref.done_logit[:, 0], atol=1e-5)
            else:
                assert fast.reward(out) is None and fast.done_logit(out) is None


def test_bf16_stepper_stays_close_to_float32():
    torch.manual_seed(0)
    m = MDNRNN(MDNRNNConfig(z_dim=8, action_dim=3, hidden=32, n_mixtures=3))
    f32, bf16 = m.stepper(), m.stepper(torch.bfloat16)
    z, a, h, c = torch.randn(6, 8), torch.randn(6, 3), torch.randn(6, 32), torch.randn(6, 32)
    h32, c32 = f32.lstm(z, a, h, c)
    h16, c16 = bf16.lstm(z, a, h, c)
    assert h16.dtype == c16.dtype == torch.float32
    assert torch.allclose(h16, h32, atol=0.03) and torch.allclose(c16, c32, atol=0.03)
    assert torch.allclose(bf16.heads(h32), f32.heads(h32), atol=0.05)


def synthetic_sequences(n, T, g):
    """z_{t+1} = 0.9 z_t + 0.5 a_t (first dims) + small noise; reward = a_0; done at the end."""
    z = torch.zeros(n, T + 1, 4)
    a = torch.randn(n, T, 2, generator=g)
    z[:, 0] = torch.randn(n, 4, generator=g)
    for t in range(T):
        drive = torch.cat([a[:, t], a[:, t]], dim=-1)
        z[:, t + 1] = 0.9 * z[:, t] + 0.5 * drive + 0.05 * torch.randn(n, 4, generator=g)
    reward = a[:, :, 0].clone()
    done = torch.zeros(n, T)
    done[:, -1] = 1
    return z, a, reward, done


def test_training_on_known_dynamics_lowers_heldout_nll():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    m = small()
    train = synthetic_sequences(64, 20, g)
    held = synthetic_sequences(16, 20, g)

    def heldout_nll():
        with torch.no_grad():
            z, a, r, d = held
            return m.loss(m(z[:, :-1], a), z[:, 1:], r, d)["nll"].item()

    before = heldout_nll()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        z, a, r, d = train
        terms = m.loss(m(z[:, :-1], a), z[:, 1:], r, d)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    after = heldout_nll()
    # Noise std 0.05 gives a best possible NLL of about log(0.05 sqrt(2 pi e)) = -1.58 per dim.
    assert before > 0.5 and after < -0.5, (before, after)
    with torch.no_grad():
        z, a, r, d = held
        out = m(z[:, :-1], a)
        assert ((out.reward - r) ** 2).mean() < 0.1 * r.var()
