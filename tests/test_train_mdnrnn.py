import numpy as np
import pytest
import torch

from gen_core.checkpoint import load_checkpoint
from gen_core.config import from_dict
from gen_core.mdnrnn import MDNRNN
from worldmodels.cli import main as wm
from worldmodels.latents import LatentStore
from worldmodels.mdnrnn import (
    Episode,
    TrainMDNRNNConfig,
    done_targets,
    free_run_inputs,
    load_mdnrnn,
    make_chunks,
    reward_targets,
    self_fed_loss,
    training_batches,
    with_input_noise,
)
from worldmodels.mdnrnn import main as train_mdnrnn

Z, A = 4, 3


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
        n_mixtures=2,
        seq_len=20,
        batch_size=8,
        epochs=2,
        progress=False,
        lr=3e-3,
    )
    return from_dict(TrainMDNRNNConfig, {**base, **kw})


def random_batch(B, T):
    """A training batch of random inputs and targets, nothing ending."""
    return {
        "z": torch.randn(B, T, Z),
        "z_next": torch.randn(B, T, Z),
        "actions": torch.rand(B, T, A),
        "rewards": torch.randn(B, T),
        "done": torch.zeros(B, T),
        "mask": torch.ones(B, T),
    }


def test_chunks_cover_every_step_once():
    ep = Episode(
        mu=np.arange(11 * 2, dtype=np.float32).reshape(11, 2),
        logvar=np.zeros((11, 2), np.float32),
        actions=np.ones((10, 1), np.float32),
        rewards=np.arange(10, dtype=np.float32),
        done=np.zeros(10, np.float32),
    )
    ch = make_chunks([ep], 4, np.random.default_rng(3), sample_z=False, offset=True)
    assert ch["z"].shape[1] == 4
    m = ch["mask"].bool()
    assert sorted(ch["rewards"][m].tolist()) == list(range(10))
    # Each target is the next step's latent.
    np.testing.assert_array_equal(ch["z_next"][m].numpy(), ch["z"][m].numpy() + 2)


def test_end_repeats_add_chunks_closing_on_episode_ends():
    def episode(T, ended):
        done = np.zeros(T, np.float32)
        done[-1] = ended
        return Episode(
            mu=np.arange(T + 1, dtype=np.float32)[:, None],
            logvar=np.zeros((T + 1, 1), np.float32),
            actions=np.zeros((T, 1), np.float32),
            rewards=np.arange(T, dtype=np.float32),
            done=done,
        )

    eps = [episode(41, False), episode(37, True)]  # the extras follow the ended episode
    plain = make_chunks(eps, 10, np.random.default_rng(0), False, True)
    more = make_chunks(eps, 10, np.random.default_rng(0), False, True, end_repeats=6)
    # Same chunks first (same draws), then 5 more, all from the ended episode.
    n = len(plain["z"])
    assert len(more["z"]) == n + 5
    for k in plain:
        torch.testing.assert_close(more[k][:n], plain[k])
    extra_mask = more["mask"][n:].bool()
    lengths = extra_mask.sum(1)
    assert ((lengths >= 5) & (lengths <= 10)).all()
    for row, m, length in zip(more["rewards"][n:], extra_mask, lengths):
        # Each closes on the end: the last real step is reward 36 and done 1.
        assert row[m].tolist() == list(range(37 - int(length), 37))
    assert more["done"][n:].sum() == 5
    with pytest.raises(Exception, match="carry_state"):
        TrainMDNRNNConfig(end_repeats=3, carry_state=True).validate()


def test_done_horizon_marks_the_steps_before_an_end():
    ended = np.arange(6) == 5
    np.testing.assert_array_equal(done_targets(ended), [0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(done_targets(ended, 3), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(done_targets(ended, 10), [1] * 6)
    # A time-out (no termination at the end) stays all zero.
    np.testing.assert_array_equal(done_targets(np.zeros(6, bool), 3), [0] * 6)


def test_progress_reward_target():
    r = np.array([0, 0, 3, 0, 1], np.float32)
    np.testing.assert_allclose(reward_targets(r, "progress", 2), [0, 1.5, 1.5, 0.5, 1])
    np.testing.assert_array_equal(reward_targets(r, "raw", 2), r)


def test_trailing_reward_target_and_clip():
    r = np.array([0, 0, 3, -100, 1], np.float32)
    np.testing.assert_allclose(reward_targets(r, "trailing", 2), [0, 0, 1.5, -48.5, -49.5])
    # Clipping first keeps the -100 exit out of the dense target.
    np.testing.assert_allclose(reward_targets(r, "trailing", 2, [-1, 10]), [0, 0, 1.5, 1, 0])
    np.testing.assert_allclose(reward_targets(r, "raw", 1, [-1, 10]), [0, 0, 3, -1, 1])


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
        ch = make_chunks([ep], 50, np.random.default_rng(0), True, False, z_noise=scale)
        stds.append(float(ch["z"][ch["mask"].bool()].std()))
    assert abs(stds[0] - 1.0) < 0.05 and abs(stds[1] - 0.3) < 0.02 and stds[2] == 0.0


def test_clean_targets_score_against_vs_mean_while_inputs_stay_drawn():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(41, 4)).astype(np.float32)
    ep = Episode(
        mu=mu,
        logvar=np.zeros_like(mu),  # posterior std 1: draws far from the mean
        actions=np.zeros((40, 1), np.float32),
        rewards=np.zeros(40, np.float32),
        done=np.zeros(40, np.float32),
    )
    drawn = make_chunks([ep], 40, np.random.default_rng(1), True, False)
    clean = make_chunks([ep], 40, np.random.default_rng(1), True, False, clean_targets=True)
    torch.testing.assert_close(clean["z"], drawn["z"])  # the same draws as inputs
    torch.testing.assert_close(clean["z_next"][0], torch.from_numpy(mu[1:]))
    torch.testing.assert_close(drawn["z_next"][0, :-1], drawn["z"][0, 1:])
    assert (drawn["z_next"][0] - clean["z_next"][0]).abs().mean() > 0.5


def test_training_lowers_heldout_nll_and_resumes(tmp_path):
    write_latents(tmp_path / "lat")
    cfg = cfg_for(tmp_path, epochs=1)
    assert train_mdnrnn(cfg) == 0
    first = load_checkpoint(tmp_path / "m" / "mdnrnn" / "checkpoints")
    assert first.step == 1
    assert train_mdnrnn(cfg_for(tmp_path, epochs=6)) == 0  # resumes at epoch 1
    last = load_checkpoint(tmp_path / "m" / "mdnrnn" / "checkpoints")
    assert last.step == 6
    assert last.state["metrics"]["nll"] < first.state["metrics"]["nll"] - 0.5
    log = (tmp_path / "m" / "mdnrnn" / "log.txt").read_text()
    assert "resumed" in log and "epoch 6/6" in log
    model, config = load_mdnrnn(tmp_path / "m" / "mdnrnn")
    assert config["z_dim"] == Z and model.config.hidden == 32
    out = model(torch.zeros(1, 3, Z), torch.zeros(1, 3, A))
    assert out.mu.shape == (1, 3, Z, 2)


def test_joint_mixture_trains_loads_and_refuses_a_factored_resume(tmp_path, capsys):
    write_latents(tmp_path / "lat")
    assert train_mdnrnn(cfg_for(tmp_path, epochs=1, joint_mixture=True)) == 0
    first = load_checkpoint(tmp_path / "m" / "mdnrnn" / "checkpoints")
    assert train_mdnrnn(cfg_for(tmp_path, epochs=6, joint_mixture=True)) == 0
    last = load_checkpoint(tmp_path / "m" / "mdnrnn" / "checkpoints")
    assert last.state["metrics"]["nll"] < first.state["metrics"]["nll"] - 0.5
    model, _ = load_mdnrnn(tmp_path / "m" / "mdnrnn")
    assert model.config.joint_mixture
    out = model(torch.zeros(1, 3, Z), torch.zeros(1, 3, A))
    assert out.logit_pi.shape == (1, 3, 1, 2) and out.mu.shape == (1, 3, Z, 2)
    args = ["train-mdnrnn", f"runs_dir={tmp_path}", "run_name=m", f"latents={tmp_path / 'lat'}"]
    assert wm(args + ["hidden=32", "n_mixtures=2", "epochs=7", "progress=false"]) == 2
    assert "joint_mixture is True in the checkpoint but False" in capsys.readouterr().err


def test_checkpoint_from_before_joint_mixture_resumes_as_per_dimension(tmp_path):
    write_latents(tmp_path / "lat", n=3)
    assert train_mdnrnn(cfg_for(tmp_path, epochs=1)) == 0
    ckpt = tmp_path / "m" / "mdnrnn" / "checkpoints"
    f = load_checkpoint(ckpt).path / "config.yaml"
    # Drop the key, as a checkpoint written before the setting lacks it.
    f.write_text("".join(ln for ln in f.read_text().splitlines(True) if "joint_mixture" not in ln))
    assert "joint_mixture" not in load_checkpoint(ckpt).config
    assert train_mdnrnn(cfg_for(tmp_path, epochs=2)) == 0
    assert load_checkpoint(ckpt).step == 2


def test_done_reward_is_what_the_clip_took_from_the_episode_ends(tmp_path):
    store = write_latents(tmp_path / "lat", n=4)
    for i, last in [(0, -100.0), (1, -80.0)]:  # two exits, penalties the clip [-1, 100] cuts
        ep = store.load(i)
        ep["rewards"][-1] = last
        store.write_episode(i, ep)
    ep = store.load(2)
    ep["terminated"][:] = False  # a time-out: no end reward to learn
    ep["rewards"][-1] = -50.0
    store.write_episode(2, ep)
    # Episode 3 ends (terminated) with its gas reward in [0, 1]: the clip takes nothing.
    clip = dict(epochs=1, reward_clip=[-1, 100])
    assert train_mdnrnn(cfg_for(tmp_path, **clip, done_reward="clipped")) == 0
    model, config = load_mdnrnn(tmp_path / "m" / "mdnrnn")
    assert config["dream_done_reward"] == pytest.approx((-99.0 - 79.0 + 0.0) / 3)
    assert model.config.done_reward == pytest.approx(config["dream_done_reward"])
    assert train_mdnrnn(cfg_for(tmp_path, **clip, out_name="off")) == 0  # the default: none
    assert load_mdnrnn(tmp_path / "m" / "off")[0].config.done_reward == 0.0
    assert train_mdnrnn(cfg_for(tmp_path, epochs=1, out_name="noclip", done_reward="clipped")) == 0
    assert load_mdnrnn(tmp_path / "m" / "noclip")[0].config.done_reward == 0.0


def test_resume_with_other_shape_is_refused(tmp_path, capsys):
    write_latents(tmp_path / "lat", n=3)
    train_mdnrnn(cfg_for(tmp_path, epochs=1))
    args = [
        "train-mdnrnn",
        f"runs_dir={tmp_path}",
        "run_name=m",
        f"latents={tmp_path / 'lat'}",
        "hidden=64",
        "epochs=2",
        "progress=false",
    ]
    assert wm(args) == 2
    assert "hidden is 32 in the checkpoint but 64" in capsys.readouterr().err


def test_missing_latents_is_a_one_line_error(tmp_path, capsys):
    assert wm(["train-mdnrnn", f"runs_dir={tmp_path}", "epochs=1"]) == 2
    assert "run 'wm encode'" in capsys.readouterr().err


def _episode(T, offset=0.0):
    return Episode(
        mu=offset + np.arange((T + 1) * 2, dtype=np.float32).reshape(T + 1, 2),
        logvar=np.zeros((T + 1, 2), np.float32),
        actions=np.zeros((T, 1), np.float32),
        rewards=offset + np.arange(T, dtype=np.float32),
        done=np.zeros(T, np.float32),
    )


def test_carried_state_batches_walk_whole_episodes_in_order(tmp_path):
    eps = [_episode(T, 1000.0 * i) for i, T in enumerate([23, 17, 30, 9, 25])]
    cfg = cfg_for(tmp_path, carry_state=True, seq_len=7, batch_size=2)
    batches = training_batches(eps, cfg, np.random.default_rng(0))
    seen, lanes = [], []
    for batch, new_lane in batches:
        assert batch["z"].shape[1] <= 7
        if new_lane:
            lanes.append([])
        lanes[-1].append(batch)
        seen += batch["rewards"][batch["mask"].bool()].tolist()
    # Every step of every episode exactly once, 3 lanes of at most 2 episodes each.
    assert sorted(seen) == sorted(r for e in eps for r in e.rewards.tolist())
    assert len(lanes) == 3
    for lane in lanes:
        rows = torch.cat([b["rewards"] for b in lane], dim=1)  # (B, T) chunks side by side
        mask = torch.cat([b["mask"] for b in lane], dim=1).bool()
        for row, m in zip(rows, mask):
            steps = row[m]
            # Chunks follow each other in time: the lane is one episode, in order.
            assert torch.all(steps[1:] - steps[:-1] == 1)
            assert m[: int(m.sum())].all()
    # Without carried state: the old shuffled chunks, each from zero state.
    plain = training_batches(eps, cfg_for(tmp_path, seq_len=7), np.random.default_rng(0))
    assert all(new_lane for _, new_lane in plain)


def _flag_latents(path, n=40, T=60, seed=0):
    """The reward of every step is a +-1 flag shown in z only at step 0: only a memory that
    runs from the episode start can predict it after the first chunk."""
    rng = np.random.default_rng(seed)
    store = LatentStore(path)
    store.write_info({"z_dim": Z})
    for i in range(n):
        flag = rng.choice([-1.0, 1.0])
        mu = np.zeros((T + 1, Z), np.float32)
        mu[0, 0] = flag
        mu[1:] = 0.05 * rng.normal(size=(T, Z))
        store.write_episode(
            i,
            {
                "mu": mu,
                "logvar": np.full_like(mu, -8.0),
                "actions": np.zeros((T, A), np.float32),
                "rewards": np.full(T, flag, np.float32),
                "terminated": np.zeros(T, bool),
                "truncated": np.zeros(T, bool),
            },
        )


def test_carried_state_learns_a_memory_longer_than_a_chunk(tmp_path):
    _flag_latents(tmp_path / "lat")
    mse = {}
    for carry in (False, True):
        cfg = cfg_for(
            tmp_path,
            run_name=f"carry{carry}",
            carry_state=carry,
            seq_len=10,
            n_mixtures=1,
            hidden=16,
            epochs=15,
            lr=1e-2,
            heldout_fraction=0.2,
            done_weight=0.0,
        )
        assert train_mdnrnn(cfg) == 0
        ck = load_checkpoint(tmp_path / f"carry{carry}" / "mdnrnn" / "checkpoints")
        mse[carry] = ck.state["metrics"]["reward_mse"]
    # Chunks from zero state cannot know the flag past step 10 (MSE ~ its variance, 1); the
    # carried state keeps it across all six chunks.
    assert mse[True] < 0.05 < 0.5 < mse[False]


def test_self_fed_pass_reads_ms_own_draws_and_scores_real_targets(tmp_path):
    torch.manual_seed(0)
    cfg = cfg_for(tmp_path, self_feed=1, self_feed_temperature=0.0)
    model = MDNRNN(cfg.model_config(Z, A))
    B, T = 3, 12
    batch = random_batch(B, T)
    args = (batch["z_next"], batch["rewards"], batch["done"], batch["mask"])
    out = model(batch["z"], batch["actions"])
    terms = model.loss(out, *args)
    got = self_fed_loss(model, batch, out, terms, cfg, None)
    # Reference: at temperature 0 the draw is the likeliest component's mean; the first input
    # stays the real z_0, input t + 1 is the prediction made at t.
    mean = model.sample(out, 0.0)  # (B, T, Z)
    fed_z = torch.cat([batch["z"][:, :1], mean[:, :-1]], dim=1)
    fed = model.loss(model(fed_z, batch["actions"]), *args)["loss"]
    torch.testing.assert_close(got["self_fed_loss"], fed)
    torch.testing.assert_close(got["loss"], (terms["loss"] + fed) / 2)
    assert not torch.allclose(fed, terms["loss"])
    got["loss"].backward()  # gradients reach the weights through both passes
    assert model.mdn.weight.grad.abs().sum() > 0


def test_training_with_self_feed_lowers_heldout_nll(tmp_path):
    write_latents(tmp_path / "lat")
    ck = tmp_path / "m" / "mdnrnn" / "checkpoints"
    nll = []
    for epochs in (1, 4):  # the second call resumes the first
        assert train_mdnrnn(cfg_for(tmp_path, epochs=epochs, self_feed=1, carry_state=True)) == 0
        nll.append(load_checkpoint(ck).state["metrics"]["nll"])
    assert np.isfinite(nll[1]) and nll[1] < nll[0]


def test_input_noise_perturbs_inputs_only_and_hides_the_state(tmp_path):
    torch.manual_seed(0)
    batch = {"z": torch.zeros(64, 50, Z), "z_next": torch.ones(64, 50, Z)}
    noisy = with_input_noise(batch, 0.5)
    assert abs(noisy["z"].std().item() - 0.5) < 0.02
    assert torch.equal(noisy["z_next"], batch["z_next"]) and not batch["z"].any()
    assert with_input_noise(batch, 0.0) is batch
    # On the toy dynamics z_{t+1} depends on z_t: with inputs drowned in noise M has only its
    # memory of the actions to go on, and predicts the (clean) held-out steps less well.
    write_latents(tmp_path / "lat")
    nll = {}
    for std in (0.0, 3.0):
        cfg = cfg_for(tmp_path, run_name=f"n{std}", epochs=4, input_noise=std)
        assert train_mdnrnn(cfg) == 0
        ck = load_checkpoint(tmp_path / f"n{std}" / "mdnrnn" / "checkpoints")
        assert ck.config["input_noise"] == std
        nll[std] = ck.state["metrics"]["nll"]
    assert nll[0.0] + 0.05 < nll[3.0]


def test_free_run_inputs_follow_ms_own_draws_between_real_restarts(tmp_path):
    torch.manual_seed(0)
    model = MDNRNN(cfg_for(tmp_path).model_config(Z, A))
    B, T = 2, 9
    batch = {"z": torch.randn(B, T, Z), "actions": torch.rand(B, T, A)}
    # Windows of one step: every input is real.
    assert torch.equal(free_run_inputs(model, batch, 1, 1.0, None), batch["z"])
    # One window over the whole chunk at temperature 0: z_0 real, then M's own means.
    got = free_run_inputs(model, batch, T, 0.0, None)
    z, state, want = batch["z"][:, 0], None, []
    for t in range(T):
        want.append(z)
        out = model.step(z, batch["actions"][:, t], state)
        state, z = out.state, model.sample(out, 0.0)[:, 0]
    torch.testing.assert_close(got, torch.stack(want, dim=1))
    assert not torch.allclose(got[:, 1:], batch["z"][:, 1:])
    # Windows of 3 at phase 2: real inputs at t = 0, 2, 5, 8; drawn ones elsewhere.
    got = free_run_inputs(model, batch, 3, 1.0, None, phase=2)
    real = (got == batch["z"]).all(dim=-1).all(dim=0)  # (T,)
    assert real.nonzero().flatten().tolist() == [0, 2, 5, 8]
    # free_run_end 4: a row ending at t = 7 gets no real z after t = 3; the other row as before.
    batch["done"] = torch.zeros(B, T)
    batch["done"][0, 7] = 1.0
    got = free_run_inputs(model, batch, 3, 1.0, None, phase=2, end_run=4)
    real = (got == batch["z"]).all(dim=-1)  # (B, T)
    assert real[0].nonzero().flatten().tolist() == [0, 2]
    assert real[1].nonzero().flatten().tolist() == [0, 2, 5, 8]
    with pytest.raises(Exception, match="set free_run too"):
        TrainMDNRNNConfig(free_run_end=150).validate()


def test_training_with_free_run_lowers_heldout_nll(tmp_path):
    write_latents(tmp_path / "lat")
    ck = tmp_path / "m" / "mdnrnn" / "checkpoints"
    nll = []
    for epochs in (1, 4):  # the second call resumes the first
        assert train_mdnrnn(cfg_for(tmp_path, epochs=epochs, free_run=5)) == 0
        nll.append(load_checkpoint(ck).state["metrics"]["nll"])
    assert np.isfinite(nll[1]) and nll[1] < nll[0]


def test_free_run_every_k_batches_runs_the_pass_on_every_kth_batch(tmp_path, monkeypatch):
    import worldmodels.mdnrnn as mdnrnn_stage

    write_latents(tmp_path / "lat")
    calls = []
    real_loss = mdnrnn_stage.free_run_loss

    def counting(model, batch, terms, cfg, state):
        calls.append(len(calls))
        return real_loss(model, batch, terms, cfg, state)

    monkeypatch.setattr(mdnrnn_stage, "free_run_loss", counting)
    counts = {}
    for every in (1, 3):
        calls.clear()
        cfg = cfg_for(tmp_path, run_name=f"e{every}", epochs=1, free_run=5, free_run_every=every)
        assert train_mdnrnn(cfg) == 0
        counts[every] = len(calls)
    # Every batch with k = 1; with k = 3 batches 0, 3, 6, ... only.
    assert counts[1] >= 4 and counts[3] == -(-counts[1] // 3)


def test_free_run_z_only_leaves_the_reward_and_done_heads_to_teacher_forcing(tmp_path):
    from worldmodels.mdnrnn import free_run_loss

    torch.manual_seed(0)
    model = MDNRNN(cfg_for(tmp_path).model_config(Z, A))
    batch = random_batch(2, 9)
    grads = {}
    for z_only in (False, True):
        model.zero_grad(set_to_none=True)
        cfg = cfg_for(tmp_path, free_run=3, free_run_z_only=z_only)
        terms = free_run_loss(model, batch, {"loss": torch.zeros(())}, cfg, None)
        terms["loss"].backward()
        grads[z_only] = {
            name: p.grad.abs().sum().item() if p.grad is not None else 0.0
            for name, p in model.named_parameters()
        }
    assert grads[False]["reward.weight"] > 0 and grads[False]["done.weight"] > 0
    assert grads[True]["reward.weight"] == 0 and grads[True]["done.weight"] == 0
    assert grads[True]["mdn.weight"] > 0 and grads[True]["lstm.weight_ih_l0"] > 0
