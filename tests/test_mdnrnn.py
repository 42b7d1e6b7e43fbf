"""The MDN-RNN (gen_core/mdnrnn.py) and the mixture heads and step protocol of gen_core/mdn.py."""

import math

import pytest
import torch

from gen_core.mdn import (
    END_POS_WEIGHT,
    MDNHeads,
    MDNHeadsConfig,
    add_noise,
    mixture_nll,
    pick_components,
    sample_mixture,
)
from gen_core.mdnrnn import MDNRNN, LSTMState, LSTMStepper, MDNRNNConfig

Z, A, H, K = 4, 2, 16, 3


def small(**kw):
    return MDNRNN(MDNRNNConfig(z_dim=Z, action_dim=A, hidden=H, n_mixtures=K, **kw))


def normal(x, m, s):
    return math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))


# ------------------------------------------------------------------------------ model and heads


def test_shapes_and_loss_terms():
    m = small()
    z, a = torch.randn(5, 7, Z), torch.randn(5, 7, A)
    out = m(z, a)
    assert out.logit_pi.shape == out.mu.shape == out.log_sigma.shape == (5, 7, Z, K)
    assert out.reward.shape == out.done_logit.shape == (5, 7)
    terms = m.loss(out, torch.randn(5, 7, Z), torch.randn(5, 7), torch.zeros(5, 7))
    assert set(terms) == {"loss", "nll", "reward_mse", "done_bce"}
    assert all(t.shape == () and torch.isfinite(t) for t in terms.values())
    no_heads = small(reward_head=False, done_head=False)
    out = no_heads(z, a)
    assert out.reward is None and out.done_logit is None
    assert set(no_heads.loss(out, torch.randn(5, 7, Z))) == {"loss", "nll"}
    assert no_heads.heads.reward is None and no_heads.heads.done is None


def test_forward_continues_from_a_given_state():
    """forward(z, a, state) continues a sequence: two halves from the carried LSTM state equal
    one pass over the whole."""
    torch.manual_seed(0)
    m = small()
    z, a = torch.randn(3, 8, Z), torch.randn(3, 8, A)
    whole = m(z, a)
    _, (h, c) = m.lstm(torch.cat([z[:, :5], a[:, :5]], dim=-1))
    second = m(z[:, 5:], a[:, 5:], LSTMState(h[0], c[0]))
    torch.testing.assert_close(second.mu, whole.mu[:, 5:])
    torch.testing.assert_close(second.reward, whole.reward[:, 5:])
    # From zeros, the same as no state.
    zeros = LSTMState(torch.zeros(3, H), torch.zeros(3, H))
    torch.testing.assert_close(m(z, a, zeros).logit_pi, whole.logit_pi)
    assert not torch.allclose(m(z[:, 5:], a[:, 5:]).mu, whole.mu[:, 5:])


def test_mixture_nll_matches_hand_computation():
    logit_pi = torch.tensor([[0.0, math.log(3.0)]])  # pi = (0.25, 0.75)
    mu = torch.tensor([[0.0, 2.0]])
    log_sigma = torch.tensor([[0.0, math.log(0.5)]])
    x = torch.tensor([1.0])
    expected = -math.log(0.25 * normal(1.0, 0.0, 1.0) + 0.75 * normal(1.0, 2.0, 0.5))
    got = mixture_nll(logit_pi, mu, log_sigma, x)
    assert got.shape == (1,)
    assert torch.allclose(got, torch.tensor([expected]), atol=1e-6)
    # Per dimension: two dimensions, each its own mixture.
    got2 = mixture_nll(
        logit_pi.expand(2, 2), torch.stack([mu[0], mu[0] + 1]), log_sigma.expand(2, 2), x.repeat(2)
    )
    second = -math.log(0.25 * normal(1.0, 1.0, 1.0) + 0.75 * normal(1.0, 3.0, 0.5))
    assert torch.allclose(got2, torch.tensor([expected, second]), atol=1e-6)


def test_loss_is_nll_plus_reward_mse_plus_weighted_end_bce_over_real_steps():
    torch.manual_seed(0)
    heads = MDNHeads(MDNHeadsConfig(z_dim=Z, features=H, n_mixtures=K))
    out = heads(torch.randn(2, 3, H))
    zn, r = torch.randn(2, 3, Z), torch.randn(2, 3)
    done = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    t = heads.loss(out, zn, r, done)
    torch.testing.assert_close(t["loss"], t["nll"] + t["reward_mse"] + t["done_bce"])
    # Each term by hand: the NLL is a mean per latent dimension and step.
    nll = mixture_nll(out.logit_pi, out.mu, out.log_sigma, zn).mean()
    torch.testing.assert_close(t["nll"], nll)
    torch.testing.assert_close(t["reward_mse"], ((out.reward - r) ** 2).mean())
    # An end's BCE term weighs END_POS_WEIGHT times an ordinary step's.
    p = torch.sigmoid(out.done_logit)
    bce = -(END_POS_WEIGHT * done * torch.log(p) + (1 - done) * torch.log(1 - p))
    torch.testing.assert_close(t["done_bce"], bce.mean())
    assert END_POS_WEIGHT == 10.0
    # Masked-out steps do not count: changing their targets leaves every term unchanged, and
    # the means are over the real steps only.
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    t1 = heads.loss(out, zn, r, done, mask)
    zn2, r2, done2 = zn.clone(), r.clone(), done.clone()
    zn2[0, 2] += 100
    r2[1, 1:] -= 50
    done2[1, 1] = 0.0
    t2 = heads.loss(out, zn2, r2, done2, mask)
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k])
    m = mask.bool()
    torch.testing.assert_close(t1["reward_mse"], ((out.reward - r) ** 2)[m].mean())
    torch.testing.assert_close(t1["done_bce"], bce[m].mean())


def test_log_sigma_is_clamped_for_a_finite_nll():
    heads = MDNHeads(MDNHeadsConfig(z_dim=1, features=1, n_mixtures=1, min_log_sigma=-3.0))
    with torch.no_grad():
        heads.mdn.weight.zero_()
        heads.mdn.bias.copy_(torch.tensor([0.0, 0.0, -50.0]))  # logit, mu, log_sigma
    out = heads(torch.zeros(1, 1, 1))
    assert out.log_sigma.item() == -3.0
    assert torch.isfinite(heads.loss(out, torch.ones(1, 1, 1))["loss"])


# ------------------------------------------------------------------------------ sampling maths


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


def test_sample_mixture_draws_components_with_tempered_weights():
    # Far-apart components: which one a draw came from is plain from its value.
    n = 20000
    logit_pi = torch.tensor([1.0, 0.0, -1.0]).expand(n, 2, 3)
    mu = torch.tensor([-10.0, 0.0, 10.0]).expand(n, 2, 3)
    log_sigma = torch.full((n, 2, 3), math.log(0.1))
    g = torch.Generator().manual_seed(0)
    for tau in (0.5, 1.0, 2.0):
        x = sample_mixture(logit_pi, mu, log_sigma, tau, generator=g)  # (n, 2)
        assert x.shape == (n, 2)
        k = torch.bucketize(x, torch.tensor([-5.0, 5.0]))  # component of each draw
        freq = torch.bincount(k.flatten(), minlength=3).float() / k.numel()
        expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]) / tau, dim=0)
        assert torch.allclose(freq, expected, atol=0.01), (tau, freq, expected)
        spread = (x - (k - 1) * 10.0).std()  # around the picked mean: sigma sqrt(tau)
        assert abs(spread.item() - 0.1 * math.sqrt(tau)) < 0.005


def test_sample_mixture_is_pick_components_then_add_noise_from_one_generator():
    torch.manual_seed(0)
    logit_pi, mu, log_sigma = torch.randn(6, Z, K), torch.randn(6, Z, K), torch.randn(6, Z, K)
    got = sample_mixture(logit_pi, mu, log_sigma, 0.7, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    k = pick_components(logit_pi.transpose(-1, -2), 0.7, g)  # (6, 1, Z)
    assert k.shape == (6, 1, Z) and k.dtype == torch.int64
    k = k.transpose(-1, -2)  # (6, Z, 1)
    mean = mu.gather(-1, k).squeeze(-1)
    want = add_noise(mean, log_sigma.gather(-1, k).squeeze(-1), 0.7, g)
    torch.testing.assert_close(got, want)


def test_pick_components_argmax_when_cold_and_never_past_the_last():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 0.0]]).T[None]  # (1, K=3, D=2)
    assert pick_components(logits, 0.0).tolist() == [[[1, 0]]]
    # One component holding all the mass: every draw picks it, also the last one.
    last = torch.tensor([-1e9, -1e9, 0.0])[None, :, None].expand(1000, 3, 4)
    assert (pick_components(last, 1.0, torch.Generator().manual_seed(0)) == 2).all()
    wide = torch.randn(5000, 3, 4)
    k = pick_components(wide, 1.3, torch.Generator().manual_seed(1))
    assert k.min() >= 0 and k.max() <= 2


def test_add_noise_scales_sigma_by_sqrt_temperature():
    mean, log_sigma = torch.zeros(20000, 3), torch.full((20000, 3), math.log(2.0))
    for tau in (0.25, 1.0):
        x = add_noise(mean, log_sigma.clone(), tau, torch.Generator().manual_seed(0))
        assert abs(x.std().item() - 2.0 * math.sqrt(tau)) < 0.03


# ------------------------------------------------------------------------------ the fused stepper


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.3])
def test_stepper_equals_forward_step_by_step(heads, temperature):
    """LSTMStepper's fused step, run on its own draws as a dream does, gives forward's h, c,
    reward and end probability at every step, and draws what sample_mixture draws from
    forward's mixture with the same generator."""
    torch.manual_seed(0)
    m = small(reward_head=heads, done_head=heads)
    m.eval()
    s = m.stepper()
    assert isinstance(s, LSTMStepper)
    assert (s.z_dim, s.action_dim, s.feature_dim) == (Z, A, H)
    B, T = 5, 6
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    actions = torch.randn(B, T, A)
    g_step, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    state, z = LSTMState(h0.clone(), c0.clone()), torch.randn(B, Z)
    inputs, steps = [], []
    for t in range(T):
        inputs.append(z)
        out = s.step(state, z, actions[:, t], temperature, g_step)
        assert out.z.shape == (B, Z) and out.reward.shape == out.end_prob.shape == (B,)
        steps.append(out)
        state, z = out.state, out.z
    z_in = torch.stack(inputs, dim=1)  # (B, T, Z)
    with torch.no_grad():
        full = m(z_in, actions, LSTMState(h0, c0))
        hs, (h_n, c_n) = m.lstm(torch.cat([z_in, actions], -1), (h0[None], c0[None]))
    for t, out in enumerate(steps):
        torch.testing.assert_close(out.state.h, hs[:, t], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.features(out.state), hs[:, t], atol=1e-5, rtol=1e-4)
        drawn = sample_mixture(
            full.logit_pi[:, t], full.mu[:, t], full.log_sigma[:, t], temperature, g_ref
        )
        torch.testing.assert_close(out.z, drawn, atol=1e-5, rtol=1e-4)
        if heads:
            torch.testing.assert_close(out.reward, full.reward[:, t], atol=1e-5, rtol=1e-4)
            want = torch.sigmoid(full.done_logit[:, t])
            torch.testing.assert_close(out.end_prob, want, atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(out.reward, torch.zeros(B))
            assert torch.equal(out.end_prob, torch.zeros(B))
    torch.testing.assert_close(state.c, c_n[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.h, h_n[0], atol=1e-5, rtol=1e-4)


def test_observe_reads_without_drawing_and_step_reads_the_same():
    torch.manual_seed(0)
    s = small().stepper()
    assert torch.equal(s.initial_state(3).h, torch.zeros(3, H))
    state = s.initial_state(3)
    z, a = torch.randn(3, Z), torch.randn(3, A)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    seen = s.observe(state, z, a)
    stepped = s.step(state, z, a, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen.h, stepped.state.h)
    torch.testing.assert_close(seen.c, stepped.state.c)
    assert torch.equal(g.get_state(), before)
    assert torch.equal(state.h, torch.zeros(3, H))  # the state passed in is left as it was
    assert seen.h.abs().sum() > 0


def test_stepper_is_a_snapshot_of_the_weights():
    torch.manual_seed(0)
    m = small()
    s = m.stepper()
    state, z, a = s.initial_state(2), torch.randn(2, Z), torch.randn(2, A)
    before = s.step(state, z, a, 0.0)
    with torch.no_grad():
        m.heads.mdn.bias.add_(5.0)
    again = s.step(state, z, a, 0.0)
    torch.testing.assert_close(again.z, before.z)
    assert not torch.allclose(m.stepper().step(state, z, a, 0.0).z, before.z)


def test_bf16_stepper_stays_close_to_float32():
    torch.manual_seed(0)
    m = MDNRNN(MDNRNNConfig(z_dim=8, action_dim=3, hidden=32, n_mixtures=3))
    f32, bf16 = m.stepper(), m.stepper(torch.bfloat16)
    assert bf16.w_gates.dtype == torch.bfloat16
    state = LSTMState(torch.randn(6, 32), torch.randn(6, 32))
    z, a = torch.randn(6, 8), torch.randn(6, 3)
    s32 = f32.step(state, z, a, 0.0)
    s16 = bf16.step(state, z, a, 0.0)
    assert s16.state.h.dtype == s16.state.c.dtype == s16.z.dtype == torch.float32
    torch.testing.assert_close(s16.state.h, s32.state.h, atol=0.03, rtol=0)
    torch.testing.assert_close(s16.state.c, s32.state.c, atol=0.03, rtol=0)
    torch.testing.assert_close(s16.reward, s32.reward, atol=0.05, rtol=0)
    torch.testing.assert_close(s16.end_prob, s32.end_prob, atol=0.02, rtol=0)


# ------------------------------------------------------------------------------ batch states


def test_batch_state_rows_are_taken_put_repeated_and_joined():
    h = torch.arange(8.0).view(4, 2)
    s = LSTMState(h.clone(), -h.clone())
    assert len(s) == 4
    t = s.take(torch.tensor([2, 0]))
    assert isinstance(t, LSTMState)
    assert t.h.tolist() == [[4, 5], [0, 1]] and t.c.tolist() == [[-4, -5], [0, -1]]
    t.h += 100  # a taken batch is a copy
    assert s.h[2, 0] == 4
    r = s.take(torch.tensor([1, 3])).repeat_interleave(2)
    assert r.h[:, 0].tolist() == [2, 2, 6, 6] and r.c[:, 1].tolist() == [-3, -3, -7, -7]
    s.put(torch.tensor([3, 1]), LSTMState(torch.zeros(2, 2), torch.ones(2, 2)))  # in place
    assert s.h[:, 0].tolist() == [0, 0, 4, 0] and s.c[:, 0].tolist() == [0, 1, -4, 1]
    c = s.clone()
    c.h.fill_(9)
    assert s.h[0, 1] == 1  # a clone is independent
    j = LSTMState.cat([s.take(torch.tensor([0])), t])
    assert isinstance(j, LSTMState) and len(j) == 3
    assert j.h[:, 0].tolist() == [0, 104, 100]
    moved = s.to("cpu")
    assert isinstance(moved, LSTMState) and torch.equal(moved.c, s.c)


# ------------------------------------------------------------------------------ training


def synthetic_sequences(n, T, g):
    """z_{t+1} = 0.9 z_t + 0.5 a_t (first dims) + small noise; reward = a_0; done at the end."""
    z = torch.zeros(n, T + 1, Z)
    a = torch.randn(n, T, A, generator=g)
    z[:, 0] = torch.randn(n, Z, generator=g)
    for t in range(T):
        drive = torch.cat([a[:, t], a[:, t]], dim=-1)
        z[:, t + 1] = 0.9 * z[:, t] + 0.5 * drive + 0.05 * torch.randn(n, Z, generator=g)
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
        # The end head learns where episodes end (the LSTM counts the steps).
        p = torch.sigmoid(out.done_logit)
        assert p[:, -1].mean() > 0.5 and p[:, :10].mean() < 0.05, p.mean(0)
