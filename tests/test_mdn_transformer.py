"""The Transformer M (gen_core/mdn_transformer.py): ring stepper, checkpoints, training."""

import pytest
import torch

from gen_core.checkpoint import build_model, load_model, model_spec, save_checkpoint
from gen_core.errors import UserError
from gen_core.mdn import sample_mixture
from gen_core.mdn_transformer import (
    MDNTransformer,
    MDNTransformerConfig,
    RingState,
    TransformerStepper,
)
from gen_core.mdnrnn import MDNRNN, MDNRNNConfig

Z, A, W = 3, 2, 4


def small(**kw):
    torch.manual_seed(0)
    cfg = dict(z_dim=Z, action_dim=A, n_embd=16, n_layer=2, head_size=8, window=W, n_mixtures=2)
    return MDNTransformer(MDNTransformerConfig(**{**cfg, **kw}))


def sharp(m):
    """Larger random weights: outputs that depend strongly on every attended step, so a stepper
    attending to the wrong keys cannot pass for the full pass."""
    with torch.no_grad():
        for p in m.core.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return m


def test_shapes_and_config_checks():
    m = small()
    out = m(torch.randn(5, 3, Z), torch.randn(5, 3, A))
    assert out.logit_pi.shape == out.mu.shape == out.log_sigma.shape == (5, 3, Z, 2)
    assert out.reward.shape == out.done_logit.shape == (5, 3)
    terms = m.loss(out, torch.randn(5, 3, Z), torch.randn(5, 3), torch.zeros(5, 3))
    assert set(terms) == {"loss", "nll", "reward_mse", "done_bce"}
    assert m.core.config.rotary and m.core.transformer.wpe is None
    assert m.core.config.block_size == W and m.core.config.n_head == 2
    with pytest.raises(ValueError, match="head_size"):
        small(n_embd=20)
    with pytest.raises(ValueError, match="empty context"):
        m(torch.randn(1, 2, Z), torch.randn(1, 2, A), state=object())
    no_heads = small(reward_head=False, done_head=False)
    out = no_heads(torch.randn(2, 3, Z), torch.randn(2, 3, A))
    assert out.reward is None and out.done_logit is None
    s = no_heads.stepper()
    step = s.step(s.initial_state(2), torch.randn(2, Z), torch.randn(2, A), 1.0)
    assert torch.equal(step.reward, torch.zeros(2)) and torch.equal(step.end_prob, torch.zeros(2))


def test_the_full_pass_past_the_window_is_banded():
    """Sequences longer than the window read each step over the last `window` steps only: with
    one block, step t's output is that of the window ending at t alone."""
    m = sharp(small(n_layer=1)).eval()
    z, a = torch.randn(2, 11, Z), torch.randn(2, 11, A)
    with torch.no_grad():
        full = m(z, a)
        for t in range(11):
            lo = max(0, t - W + 1)
            alone = m(z[:, lo : t + 1], a[:, lo : t + 1])
            torch.testing.assert_close(alone.mu[:, -1], full.mu[:, t], atol=1e-5, rtol=1e-4)
        # A step older than the window (and than the layers' reach) changes nothing later on.
        z2 = z.clone()
        z2[:, 2] += 5.0
        moved = m(z2, a)
        torch.testing.assert_close(moved.mu[:, W + 2 :], full.mu[:, W + 2 :])
        assert not torch.allclose(moved.mu[:, 2 : W + 2], full.mu[:, 2 : W + 2])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ring_stepper_equals_the_banded_full_pass(temperature):
    """Step by step (its own draws fed back, as a dream does), for three times the window:
    the stepper's h, reward, end probability and drawn z are the full pass's."""
    m = sharp(small())
    s = m.stepper()
    assert isinstance(s, TransformerStepper)
    assert (s.z_dim, s.action_dim, s.feature_dim) == (Z, A, 16)
    B, T = 3, 3 * W
    actions = torch.randn(B, T, A)
    state, z = s.initial_state(B), torch.randn(B, Z)
    assert isinstance(state, RingState) and state.k.shape == (
        B,
        2,
        2,
        W,
        8,
    )  # (B, heads, layers, window, head size)
    assert torch.equal(s.features(state), torch.zeros(B, 16))
    g_step, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    inputs, steps = [], []
    for t in range(T):
        inputs.append(z)
        out = s.step(state, z, actions[:, t], temperature, g_step)
        steps.append((out.z, out.reward, out.end_prob, s.features(out.state).clone()))
        state, z = out.state, out.z
    assert state.pos.tolist() == [T] * B
    z_in = torch.stack(inputs, dim=1)
    with torch.no_grad():
        h = m.core.hidden(torch.cat([z_in, actions], dim=-1))  # (B, T, 16)
        full = m(z_in, actions)
    for t, (z_next, reward, end, feat) in enumerate(steps):
        torch.testing.assert_close(feat, h[:, t], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(reward, full.reward[:, t], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(end, torch.sigmoid(full.done_logit[:, t]), atol=1e-5, rtol=1e-4)
        drawn = sample_mixture(
            full.logit_pi[:, t], full.mu[:, t], full.log_sigma[:, t], temperature, g_ref
        )
        torch.testing.assert_close(z_next, drawn, atol=1e-4, rtol=1e-4)


def test_observe_and_step_read_the_same_and_observe_draws_nothing():
    m = sharp(small())
    s = m.stepper()
    z, a = torch.randn(2, Z), torch.randn(2, A)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    seen = s.observe(s.initial_state(2), z, a)
    stepped = s.step(s.initial_state(2), z, a, 1.0, g).state
    assert not torch.equal(g.get_state(), before)  # the step drew, with g
    for f in ("k", "v", "pos", "h"):
        torch.testing.assert_close(getattr(seen, f), getattr(stepped, f))
    g2 = torch.Generator().manual_seed(0)
    s.observe(s.initial_state(2), z, a)
    assert torch.equal(g2.get_state(), before)


def test_rows_at_different_positions_run_as_separate_rollouts():
    """A fresh start put into one row mid-way (as a vector env's autoreset does) runs exactly
    as a rollout of that row alone from the start, while the other rows go on undisturbed."""
    m = sharp(small())
    s = m.stepper()
    B, T, restart = 3, 3 * W + 1, W + 2
    z_in, actions = torch.randn(B, T, Z), torch.randn(B, T, A)

    def run(rows_z, rows_a, state, on_step=None):
        outs = []
        for t in range(rows_z.shape[1]):
            if on_step is not None:
                on_step(t, state)
            step = s.step(state, rows_z[:, t], rows_a[:, t], 0.0)
            outs.append((step.z, step.reward, s.features(step.state).clone()))
            state = step.state
        return outs, state

    def reset_row_1(t, state):
        if t == restart:
            state.put(torch.tensor([1]), s.initial_state(1))

    mixed, state = run(z_in, actions, s.initial_state(B), reset_row_1)
    assert state.pos.tolist() == [T, T - restart, T]
    undisturbed, _ = run(z_in, actions, s.initial_state(B))
    alone, _ = run(z_in[1:2, restart:], actions[1:2, restart:], s.initial_state(1))
    with torch.no_grad():  # the full (banded) passes over each row's own steps
        h_all = m.core.hidden(torch.cat([z_in, actions], dim=-1))  # (B, T, C)
        h_1 = m.core.hidden(torch.cat([z_in[1:2, restart:], actions[1:2, restart:]], dim=-1))
    for t in range(T):
        for got, want in zip(mixed[t], undisturbed[t]):
            torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mixed[t][2][[0, 2]], h_all[[0, 2], t], atol=1e-5, rtol=1e-4)
        if t >= restart:
            for got, want in zip(mixed[t], alone[t - restart]):
                torch.testing.assert_close(got[1:2], want, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mixed[t][2][1], h_1[0, t - restart], atol=1e-5, rtol=1e-4)
    # The restart did change the row: it has forgotten its past.
    assert not torch.allclose(mixed[restart + 1][0][1], undisturbed[restart + 1][0][1])


def test_ring_state_rows_are_taken_and_repeated():
    m = small()
    s = m.stepper()
    state = s.initial_state(2)
    state = s.observe(state, torch.randn(2, Z), torch.randn(2, A))
    rep = state.repeat_interleave(3)
    assert isinstance(rep, RingState) and len(rep) == 6 and rep.k.shape[0] == 6
    torch.testing.assert_close(rep.k[3:], state.k[1:2].expand(3, -1, -1, -1, -1))
    taken = state.take(torch.tensor([1]))
    s.observe(taken, torch.randn(1, Z), torch.randn(1, A))  # consumes `taken`, not `state`
    assert state.pos.tolist() == [1, 1]


def test_load_model_rebuilds_the_transformer_from_model_yaml(tmp_path):
    m = sharp(small(window=5, n_mixtures=3))
    spec = model_spec(m)
    assert spec["class"] == "MDNTransformer" and spec["config"]["window"] == 5
    path = save_checkpoint(
        tmp_path / "ckpt", 3, m.state_dict(), {}, {"anything": 1}, model_spec=spec
    )
    assert (path / "model.yaml").is_file()
    loaded, ck = load_model(tmp_path / "ckpt", kinds=("MDNTransformer",))
    assert isinstance(loaded, MDNTransformer) and ck.step == 3 and not loaded.training
    assert loaded.config == m.config
    z, a = torch.randn(2, 7, Z), torch.randn(2, 7, A)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, a).mu, m(z, a).mu)
    assert isinstance(build_model(spec), MDNTransformer)
    with pytest.raises(UserError, match="holds a MDNTransformer, expected MDNRNN"):
        load_model(tmp_path / "ckpt", kinds=("MDNRNN",))
    # The MDN-RNN goes the same way.
    rnn = MDNRNN(MDNRNNConfig(z_dim=Z, action_dim=A, hidden=8, n_mixtures=2))
    save_checkpoint(tmp_path / "rnn", 1, rnn.state_dict(), {}, {}, model_spec=model_spec(rnn))
    loaded_rnn, _ = load_model(tmp_path / "rnn")
    assert isinstance(loaded_rnn, MDNRNN) and loaded_rnn.config == rnn.config
    # Weights that do not fit model.yaml: one line naming the path.
    save_checkpoint(
        tmp_path / "bad", 1, m.state_dict(), {}, {}, model_spec=model_spec(small(n_embd=32))
    )
    with pytest.raises(UserError, match="weights do not fit model.yaml"):
        load_model(tmp_path / "bad")


def test_a_few_training_steps_lower_the_loss():
    """z_{t+1} = 0.8 z_t + 0.5 a_t[0], reward a_t[1]: learnable within a window."""
    m = small()
    g = torch.Generator().manual_seed(1)
    B, T = 32, 2 * W
    a = torch.randn(B, T, A, generator=g)
    z = torch.zeros(B, T + 1, Z)
    z[:, 0] = torch.randn(B, Z, generator=g)
    for t in range(T):
        z[:, t + 1] = 0.8 * z[:, t] + 0.5 * a[:, t, :1] + 0.05 * torch.randn(B, Z, generator=g)
    done = torch.zeros(B, T)
    opt = m.core.configure_optimizer(0.0, 3e-3, (0.9, 0.95))
    opt.add_param_group({"params": list(m.heads.parameters()), "weight_decay": 0.0})
    losses = []
    for _ in range(60):
        terms = m.loss(m(z[:, :-1], a), z[:, 1:], a[:, :, 1], done)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < losses[0] - 1.0, (losses[0], losses[-1])
