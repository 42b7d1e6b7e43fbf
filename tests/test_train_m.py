"""`wm train-m` (worldmodels/train_m.py) and M's training data (worldmodels/sequences.py)."""

import numpy as np
import pytest
import torch

from gen_core.checkpoint import load_checkpoint
from gen_core.config import from_dict
from gen_core.errors import UserError
from gen_core.mdn_transformer import MDNTransformer
from gen_core.mdnrnn import MDNRNN
from worldmodels.cli import main as wm
from worldmodels.episodes import split_episodes
from worldmodels.latents import LatentStore
from worldmodels.models import load_m
from worldmodels.sequences import (
    REWARD_WINDOW,
    Episode,
    chunk_bounds,
    load_episodes,
    make_chunks,
    reward_targets,
    training_batches,
)
from worldmodels.train_m import (
    TrainMConfig,
    build_m,
    evaluate,
    free_run_inputs,
    split_latent_episodes,
)
from worldmodels.train_m import main as train_m

Z, A = 4, 3
KINDS = ["lstm", "transformer"]


def write_latents(path, n=8, T=60, seed=0):
    """Known dynamics: mu_{t+1} = 0.8 mu_t + 0.5 [a, a0]; reward = gas; ends at T."""
    rng = np.random.default_rng(seed)
    store = LatentStore(path)
    store.write_info({"z_dim": Z})
    for i in range(n):
        a = rng.uniform(0, 1, (T, A)).astype(np.float32)
        mu = np.zeros((T + 1, Z), np.float32)
        mu[0] = rng.normal(size=Z)
        for t in range(T):
            mu[t + 1] = 0.8 * mu[t] + 0.5 * np.r_[a[t], a[t, :1]] + 0.02 * rng.normal(size=Z)
        store.write_episode(
            i,
            {
                "mu": mu,
                "logvar": np.full_like(mu, -8.0),
                "actions": a,
                "rewards": a[:, 1].copy(),
                "terminated": np.arange(T) == T - 1,
                "truncated": np.zeros(T, bool),
            },
        )
    return store


def cfg_for(tmp_path, **kw):
    base = dict(
        runs_dir=str(tmp_path),
        run_name="m",
        latents=str(tmp_path / "lat"),
        hidden=32,
        layers=1,
        n_mixtures=2,
        seq_len=20,
        batch_size=8,
        epochs=2,
        progress=False,
        lr=3e-3,
        threads=1,
        heldout_fraction=0.25,
    )
    return from_dict(TrainMConfig, {**base, **kw})


def ckpt_dir(tmp_path, run="m", out="m"):
    return tmp_path / run / out / "checkpoints"


@pytest.fixture
def latents(tmp_path):
    return write_latents(tmp_path / "lat")


# ---------------------------------------------------------------------------------- data


def test_progress_reward_target():
    r = np.array([0, 0, 3, 0, 1], np.float32)
    np.testing.assert_allclose(reward_targets(r, "progress", 2), [0, 1.5, 1.5, 0.5, 1])
    np.testing.assert_array_equal(reward_targets(r, "raw", 2), r)
    assert reward_targets(r, "raw").dtype == np.float32
    # The default window: a single reward spread over the REWARD_WINDOW steps that lead to it.
    spike = np.zeros(50, np.float32)
    spike[30] = REWARD_WINDOW
    target = reward_targets(spike, "progress")
    np.testing.assert_allclose(target[30 - REWARD_WINDOW + 1 : 31], 1.0)
    assert target[: 30 - REWARD_WINDOW + 1].sum() == 0 and target[31:].sum() == 0


def test_trailing_reward_target_and_clip():
    r = np.array([0, 0, 3, -100, 1], np.float32)
    np.testing.assert_allclose(reward_targets(r, "trailing", 2), [0, 0, 1.5, -48.5, -49.5])
    # Clipping first keeps the -100 exit out of the dense target.
    np.testing.assert_allclose(reward_targets(r, "trailing", 2, [-1, 10]), [0, 0, 1.5, 1, 0])
    np.testing.assert_allclose(reward_targets(r, "raw", 1, [-1, 10]), [0, 0, 3, -1, 1])


def test_chunk_bounds_cut_at_the_first_border_then_every_seq_len():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(10, 4, 2) == [(0, 2), (2, 6), (6, 10)]
    assert chunk_bounds(8, 4, 0) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 4, 3) == [(0, 3)]


def _episode(T, offset=0.0):
    return Episode(
        mu=offset + np.arange((T + 1) * 2, dtype=np.float32).reshape(T + 1, 2),
        logvar=np.zeros((T + 1, 2), np.float32),
        actions=np.ones((T, 1), np.float32),
        rewards=offset + np.arange(T, dtype=np.float32),
        done=(np.arange(T) == T - 1).astype(np.float32),
    )


def test_chunks_cover_every_step_once():
    eps = [_episode(10), _episode(7, 1000.0)]
    for offset in (False, True):
        ch = make_chunks(eps, 4, np.random.default_rng(3), z_noise=0.0, offset=offset)
        assert ch["z"].shape[1:] == (4, 2) and ch["actions"].shape[1:] == (4, 1)
        m = ch["mask"].bool()
        steps = sorted(ch["rewards"][m].tolist())
        assert steps == list(range(10)) + [1000.0 + t for t in range(7)]
        # Each target is the next step's latent (V's mean, z_noise 0).
        np.testing.assert_array_equal(ch["z_next"][m].numpy(), ch["z"][m].numpy() + 2)
        assert ch["done"].sum() == 2 and (ch["done"][~m] == 0).all()  # padding is zeros
        assert (ch["z"][~m] == 0).all()
    # Without the offset every chunk starts on a multiple of seq_len.
    plain = make_chunks(eps, 4, np.random.default_rng(3), 0.0, False)
    assert plain["rewards"][:, 0].tolist() == [0, 4, 8, 1000, 1004]


def test_z_noise_scales_the_posterior_draw():
    ep = Episode(
        mu=np.zeros((201, 4), np.float32),
        logvar=np.zeros((201, 4), np.float32),  # posterior std 1
        actions=np.zeros((200, 1), np.float32),
        rewards=np.zeros(200, np.float32),
        done=np.zeros(200, np.float32),
    )
    stds = []
    for scale in (1.0, 0.3, 0.0):
        ch = make_chunks([ep], 50, np.random.default_rng(0), scale, False)
        stds.append(float(ch["z"][ch["mask"].bool()].std()))
        # The target is the same draw as the next step's input.
        torch.testing.assert_close(ch["z_next"][:, :-1], ch["z"][:, 1:])
    assert abs(stds[0] - 1.0) < 0.05 and abs(stds[1] - 0.3) < 0.02 and stds[2] == 0.0


def test_training_batches_shuffle_every_chunk_into_batches():
    eps = [_episode(T, 1000.0 * i) for i, T in enumerate([23, 17, 30])]
    batches = training_batches(eps, 7, 3, 0.0, np.random.default_rng(0))
    assert all(len(b["z"]) <= 3 for b in batches) and len(batches[0]["z"]) == 3
    seen = torch.cat([b["rewards"][b["mask"].bool()] for b in batches]).tolist()
    assert sorted(seen) == sorted(r for e in eps for r in e.rewards.tolist())
    again = training_batches(eps, 7, 3, 0.0, np.random.default_rng(0))
    for a, b in zip(batches, again):
        torch.testing.assert_close(a["z"], b["z"])
    other = training_batches(eps, 7, 3, 0.0, np.random.default_rng(1))
    assert not all(
        a["z"].shape == b["z"].shape and torch.equal(a["z"], b["z"]) for a, b in zip(batches, other)
    )


def test_load_episodes_makes_the_reward_targets(latents):
    eps = load_episodes(latents, "trailing", [0.0, 0.5])
    assert len(eps) == 8
    raw = latents.load(0)
    np.testing.assert_allclose(
        eps[0].rewards, reward_targets(raw["rewards"], "trailing", clip=[0.0, 0.5])
    )
    assert eps[0].done.dtype == np.float32 and eps[0].done.tolist() == [0.0] * 59 + [1.0]
    np.testing.assert_array_equal(eps[0].mu, raw["mu"])


def test_split_latent_episodes_holds_out_vs_episodes(latents):
    eps = load_episodes(latents, "raw", [])
    train, held = split_latent_episodes(latents, eps, 0.25, seed=3)
    _, held_idx = split_episodes(latents.indices(), 0.25, 3)
    assert len(train) + len(held) == 8 and len(held) == len(held_idx) >= 1
    for i, ep in zip(held_idx, held):
        np.testing.assert_array_equal(ep.mu, eps[i].mu)
    assert split_latent_episodes(latents, eps, 0.0, 3) == (eps, [])


def test_config_checks_and_build_m():
    cfg = from_dict(TrainMConfig, {"kind": "transformer", "hidden": 64, "layers": 3})
    m = build_m(cfg, Z, A)
    assert isinstance(m, MDNTransformer)
    c = m.config
    assert (c.n_embd, c.n_layer, c.head_size, c.window) == (64, 3, 32, cfg.seq_len // 2)
    assert (c.z_dim, c.action_dim, c.n_mixtures) == (Z, A, cfg.n_mixtures)
    rnn = build_m(from_dict(TrainMConfig, {"hidden": 48}), Z, A)
    assert isinstance(rnn, MDNRNN) and rnn.config.hidden == 48 and rnn.config.z_dim == Z
    with pytest.raises(UserError, match="heads of 32"):
        from_dict(TrainMConfig, {"kind": "transformer", "hidden": 48}).validate()
    with pytest.raises(UserError, match="reward_clip"):
        from_dict(TrainMConfig, {"reward_clip": [1.0, -1.0]}).validate()


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_train_m_lowers_heldout_nll_and_writes_a_loadable_m(tmp_path, latents, kind):
    assert train_m(cfg_for(tmp_path, kind=kind, epochs=1)) == 0
    first = load_checkpoint(ckpt_dir(tmp_path))
    assert first.step == 1
    assert train_m(cfg_for(tmp_path, kind=kind, epochs=5)) == 0  # resumes at epoch 1
    last = load_checkpoint(ckpt_dir(tmp_path))
    assert last.step == 5
    assert last.state["metrics"]["nll"] < first.state["metrics"]["nll"] - 0.3
    assert 0.9 < last.state["metrics"]["done_acc"] <= 1.0
    log = (tmp_path / "m" / "m" / "log.txt").read_text()
    assert "resumed" in log and "epoch 5/5" in log and kind in log
    # model.yaml describes the model: load_m rebuilds it without the run's config.
    assert (last.path / "model.yaml").is_file()
    cls = MDNRNN if kind == "lstm" else MDNTransformer
    assert last.model_spec["class"] == cls.__name__
    model, config = load_m(tmp_path / "m" / "m")
    assert isinstance(model, cls) and not model.training
    assert config["kind"] == kind and config["z_dim"] == Z and config["action_dim"] == A
    ref = build_m(cfg_for(tmp_path, kind=kind), Z, A)
    ref.load_state_dict(last.model)
    ref.eval()
    z, a = torch.randn(2, 7, Z), torch.rand(2, 7, A)
    with torch.no_grad():
        out = model(z, a)
        assert out.mu.shape == (2, 7, Z, 2)
        torch.testing.assert_close(out.mu, ref(z, a).mu)
    step = model.stepper().step(model.stepper().initial_state(2), z[:, 0], a[:, 0], 1.0)
    assert step.z.shape == (2, Z)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_interruption_gives_identical_weights(tmp_path, latents, kind):
    """Three epochs straight, or two and then a resume to three: the same weights (the data
    order, V draws, free-running draws and optimiser all continue where they stopped)."""
    straight = cfg_for(tmp_path, kind=kind, epochs=3, free_run=4, run_name="a")
    assert train_m(straight) == 0
    assert train_m(cfg_for(tmp_path, kind=kind, epochs=2, free_run=4, run_name="b")) == 0
    interrupted = load_checkpoint(ckpt_dir(tmp_path, "b")).model
    assert train_m(cfg_for(tmp_path, kind=kind, epochs=3, free_run=4, run_name="b")) == 0
    a = load_checkpoint(ckpt_dir(tmp_path, "a"))
    b = load_checkpoint(ckpt_dir(tmp_path, "b"))
    assert a.step == b.step == 3
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    assert any(not torch.equal(interrupted[k], b.model[k]) for k in b.model)
    assert a.state["metrics"] == b.state["metrics"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden": 64}, "hidden is 32 in the checkpoint but 64"),
        ({"kind": "transformer"}, "kind is 'lstm' in the checkpoint but 'transformer'"),
        ({"n_mixtures": 3}, "n_mixtures is 2 in the checkpoint but 3"),
    ],
)
def test_resume_with_other_shape_is_refused(tmp_path, change, message):
    write_latents(tmp_path / "lat", n=3, T=30)
    assert train_m(cfg_for(tmp_path, epochs=1)) == 0
    with pytest.raises(UserError, match=f"cannot resume, {message}"):
        train_m(cfg_for(tmp_path, epochs=2, **change))
    # The LSTM's weights do not depend on seq_len (the Transformer's window does).
    assert train_m(cfg_for(tmp_path, epochs=1, seq_len=10)) == 0
    assert load_checkpoint(ckpt_dir(tmp_path)).step == 1
    # Settings that do not shape the weights may change.
    assert train_m(cfg_for(tmp_path, epochs=2, lr=1e-4, z_noise=0.5)) == 0
    assert load_checkpoint(ckpt_dir(tmp_path)).step == 2


def test_training_without_held_out_episodes(tmp_path):
    """heldout_fraction 0 (allowed; split_latent_episodes returns no held-out episodes) trains
    on every episode and reports no held-out metrics."""
    write_latents(tmp_path / "lat", n=3, T=30)
    assert train_m(cfg_for(tmp_path, epochs=1, heldout_fraction=0.0)) == 0
    assert load_checkpoint(ckpt_dir(tmp_path)).state["metrics"] == {}


def test_missing_latents_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="run 'wm encode'"):
        train_m(cfg_for(tmp_path, latents=str(tmp_path / "nothing")))


def test_cli_runs_train_m_and_refuses_a_resume_of_another_kind(tmp_path, capsys):
    write_latents(tmp_path / "lat", n=3, T=30)
    args = [
        "train-m",
        f"runs_dir={tmp_path}",
        "run_name=m",
        f"latents={tmp_path / 'lat'}",
        "hidden=32",
        "n_mixtures=2",
        "seq_len=20",
        "progress=false",
        "threads=1",
    ]
    assert wm([*args, "epochs=1"]) == 0
    assert load_checkpoint(ckpt_dir(tmp_path)).model_spec["class"] == "MDNRNN"
    capsys.readouterr()
    assert wm([*args, "epochs=2", "kind=transformer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume, kind is 'lstm' in the checkpoint but 'transformer'" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert wm(["train-m", f"runs_dir={tmp_path}", "run_name=x", "epochs=1"]) == 2
    assert "run 'wm encode'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_free_run_inputs_follow_ms_own_draws_between_real_restarts(tmp_path, kind):
    model = build_m(cfg_for(tmp_path, kind=kind), Z, A)
    model.train()
    B, T = 2, 9
    torch.manual_seed(0)
    batch = {"z": torch.randn(B, T, Z), "actions": torch.rand(B, T, A)}
    # Windows of one step: every input is real.
    assert torch.equal(free_run_inputs(model, batch, 1, 0), batch["z"])
    assert model.training  # back in training mode for the pass that follows
    # One window over the whole chunk: z_0 real, then M's own draws at temperature 1, as the
    # one-step protocol draws them (the global generator).
    torch.manual_seed(5)
    got = free_run_inputs(model, batch, T, 0)
    torch.manual_seed(5)
    m = model.stepper()
    state, z, want = m.initial_state(B), batch["z"][:, 0], []
    for t in range(T):
        want.append(z)
        s = m.step(state, z, batch["actions"][:, t], 1.0)
        state, z = s.state, s.z
    torch.testing.assert_close(got, torch.stack(want, dim=1))
    assert not torch.allclose(got[:, 1:], batch["z"][:, 1:])
    # Windows of 3 at phase 2: real inputs at t = 0, 2, 5, 8; drawn ones elsewhere.
    got = free_run_inputs(model, batch, 3, 2)
    real = (got == batch["z"]).all(dim=-1)  # (B, T)
    for row in real:
        assert row.nonzero().flatten().tolist() == [0, 2, 5, 8]


@pytest.mark.parametrize("kind", KINDS)
def test_training_with_free_run_lowers_heldout_nll(tmp_path, latents, kind):
    nll = []
    for epochs in (1, 4):  # the second call resumes the first
        assert train_m(cfg_for(tmp_path, kind=kind, epochs=epochs, free_run=5)) == 0
        nll.append(load_checkpoint(ckpt_dir(tmp_path)).state["metrics"]["nll"])
    assert np.isfinite(nll[1]) and nll[1] < nll[0]
    assert load_checkpoint(ckpt_dir(tmp_path)).config["free_run"] == 5


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_is_the_masked_mean_over_all_chunks(tmp_path, latents, kind):
    torch.manual_seed(0)
    model = build_m(cfg_for(tmp_path, kind=kind), Z, A)
    eps = load_episodes(latents, "raw", [])
    chunks = make_chunks(eps, 20, np.random.default_rng(0), 0.0, True)  # some padded
    assert (chunks["mask"] == 0).any()
    got = evaluate(model, chunks, "cpu", batch=5)
    assert model.training
    model.eval()
    with torch.no_grad():
        out = model(chunks["z"], chunks["actions"])
        terms = model.loss(out, chunks["z_next"], chunks["rewards"], chunks["done"], chunks["mask"])
    assert got["nll"] == pytest.approx(terms["nll"].item(), rel=1e-5)
    assert got["reward_mse"] == pytest.approx(terms["reward_mse"].item(), rel=1e-5)
    m = chunks["mask"].bool()
    acc = ((out.done_logit > 0).float() == chunks["done"])[m].float().mean().item()
    assert got["done_acc"] == pytest.approx(acc, rel=1e-6)


def test_transformer_resume_with_another_window_or_depth_is_refused(tmp_path):
    write_latents(tmp_path / "lat", n=3, T=30)
    assert train_m(cfg_for(tmp_path, epochs=1, kind="transformer", hidden=32)) == 0
    for change, message in [({"seq_len": 10}, "seq_len is 20"), ({"layers": 3}, "layers is 1")]:
        with pytest.raises(UserError, match=f"cannot resume, {message} in the checkpoint"):
            train_m(cfg_for(tmp_path, epochs=2, kind="transformer", hidden=32, **change))
