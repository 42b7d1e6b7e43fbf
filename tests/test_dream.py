"""The dream (worldmodels/dream.py), for both Ms: the MDN-RNN's and the Transformer's steppers."""

import dataclasses
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from gen_core.mdn import WorldStep
from gen_core.mdn_transformer import MDNTransformer, MDNTransformerConfig
from gen_core.mdnrnn import MDNRNN, MDNRNNConfig
from worldmodels.controller import BatchController, ControllerSpec, controller_obs
from worldmodels.dream import (
    DREAM_ENV_ID,
    DreamConfig,
    DreamEnv,
    DreamStarts,
    DreamVectorEnv,
    dream_returns,
    dream_rollouts,
)
from worldmodels.train_controller import DreamFitness

Z, A = 4, 3
KINDS = ["lstm", "transformer"]
NEVER_ENDS = DreamConfig(end_threshold=1.0)
# End heads (weight scale, bias) under which some of a few dreams end, at various steps.
ENDING = {"MDNRNN": (20.0, -2.0), "MDNTransformer": (10.0, -3.0)}


def build(kind, seed=0, **heads):
    torch.manual_seed(seed)
    if kind == "lstm":
        return MDNRNN(MDNRNNConfig(z_dim=Z, action_dim=A, hidden=8, n_mixtures=2, **heads))
    return MDNTransformer(
        MDNTransformerConfig(
            z_dim=Z,
            action_dim=A,
            n_embd=16,
            n_layer=2,
            head_size=8,
            window=4,
            n_mixtures=2,
            **heads,
        )
    )


def full_features(model, z, a):
    """What the stepper's features should be after reading (z, a) (B, T, .) from an empty
    memory, by the model's own sequence pass: (B, T, feature_dim)."""
    x = torch.cat([z, a], dim=-1)
    with torch.no_grad():
        if isinstance(model, MDNRNN):
            return model.lstm(x)[0]
        return model.core.eval().hidden(x)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def model(kind):
    return build(kind)


def episodes(lengths=(29, 29, 29), seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "mu": rng.normal(size=(T + 1, Z)).astype(np.float32),
            "actions": rng.uniform(0, 1, (T, A)).astype(np.float32),
        }
        for T in lengths
    ]


def starts(stepper, n=6):
    return DreamStarts.from_episodes(stepper, episodes(), n, warmup=5, max_start=10, seed=1)


def kwargs(stepper, **kw):
    return dict(
        model=stepper, starts=starts(stepper), action_low=[-1, 0, 0], action_high=[1, 1, 1], **kw
    )


def find(eps, z):
    """(episode, step) whose latent is z."""
    ((e, t),) = [
        (e, t)
        for e, ep in enumerate(eps)
        for t in range(len(ep["mu"]))
        if np.array_equal(ep["mu"][t], z.numpy())
    ]
    return e, t


# ---------------------------------------------------------------------------------- start states


def test_starts_read_the_warmup_from_an_empty_memory(model):
    s = model.stepper()
    eps = episodes((29, 12, 40))
    st = DreamStarts.from_episodes(s, eps, 9, warmup=5, max_start=10, seed=2)
    assert st.z.shape == (9, Z) and len(st) == len(st.state) == 9
    for i in range(9):
        e, t = find(eps, st.z[i])
        assert 5 <= t <= 15
        mu, act = torch.as_tensor(eps[e]["mu"]), torch.as_tensor(eps[e]["actions"])
        want = full_features(model, mu[None, t - 5 : t], act[None, t - 5 : t])[0, -1]
        torch.testing.assert_close(s.features(st.state)[i], want, atol=1e-5, rtol=1e-4)
    # max_start=0: right after the warm-up, as the real env's episode start.
    first = DreamStarts.from_episodes(s, eps, 5, warmup=5, max_start=0, seed=2)
    assert {find(eps, z)[1] for z in first.z} == {5}
    # max_start=None: anywhere along the episode.
    anywhere = DreamStarts.from_episodes(s, eps, 40, warmup=5, max_start=None, seed=2)
    assert max(find(eps, z)[1] for z in anywhere.z) > 15
    # No warm-up: M's empty memory.
    cold = DreamStarts.from_episodes(s, eps, 2, warmup=0)
    assert torch.equal(s.features(cold.state), torch.zeros(2, s.feature_dim))
    with pytest.raises(ValueError, match="longer than the warm-up"):
        DreamStarts.from_episodes(s, eps, 2, warmup=40)


def test_starts_from_steps_take_and_to(model):
    s = model.stepper()
    z, a = torch.randn(3, 4, Z), torch.rand(3, 3, A)
    st = DreamStarts.from_steps(s, z, a)
    torch.testing.assert_close(st.z, z[:, -1])
    torch.testing.assert_close(
        s.features(st.state), full_features(model, z[:, :3], a)[:, -1], atol=1e-5, rtol=1e-4
    )
    zi, state = st.take(torch.tensor([2, 0, 2]))
    torch.testing.assert_close(zi, z[[2, 0, 2], -1])
    torch.testing.assert_close(s.features(state), s.features(st.state)[[2, 0, 2]])
    # A taken state is a copy: stepping it leaves the bank as it was.
    before = s.features(st.state).clone()
    s.step(state, zi, torch.zeros(3, A), 1.0)
    torch.testing.assert_close(s.features(st.state), before)
    moved = st.to("cpu")
    assert isinstance(moved, DreamStarts) and torch.equal(moved.z, st.z)


# ---------------------------------------------------------------------------------- gymnasium


def test_single_dream_passes_gymnasium_env_checker(model):
    env = DreamEnv(**kwargs(model.stepper(), max_steps=20))
    check_env(env, skip_render_check=True)


def test_vector_dream_api_spaces_and_autoreset(model):
    s = model.stepper()
    env = gym.make_vec(
        DREAM_ENV_ID,
        num_envs=3,
        vectorization_mode="vector_entry_point",
        **kwargs(s, max_steps=4, dream=NEVER_ENDS),
    )
    assert isinstance(env, DreamVectorEnv)
    F = s.feature_dim
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, Z + F) and env.observation_space.contains(obs)
    assert env.single_action_space.low.tolist() == [-1, 0, 0]
    for _ in range(4):
        obs, r, term, trunc, _ = env.step(env.action_space.sample())
        assert obs.shape == (3, Z + F) and r.shape == term.shape == trunc.shape == (3,)
        assert r.dtype == np.float64 and term.dtype == np.bool_
        # The observation is [z, features]: C's input.
        np.testing.assert_allclose(obs[:, Z:], s.features(env.state).numpy())
    assert trunc.all() and not term.any()  # time limit after 4 steps
    obs, r, term, trunc, _ = env.step(env.action_space.sample())  # next-step autoreset
    assert (r == 0).all() and not term.any() and not trunc.any()
    assert (env.t == 0).all()
    z_only = DreamVectorEnv(num_envs=2, observe_hidden=False, **kwargs(s))
    assert z_only.reset(seed=0)[0].shape == (2, Z)


def test_render_decodes_the_current_latents(model):
    s = model.stepper()

    def decoder(z):  # (B, Z) -> (B, 3, 2, 2) in [0, 1]: every pixel the sigmoid of z[0]
        return torch.sigmoid(z[:, :1, None, None]).expand(-1, 3, 2, 2)

    env = DreamVectorEnv(num_envs=2, decoder=decoder, render_mode="rgb_array", **kwargs(s))
    env.reset(seed=0)
    frames = env.render()
    assert frames.shape == (2, 2, 2, 3) and frames.dtype == np.uint8
    want = (torch.sigmoid(env.z[:, 0]) * 255).round().byte().numpy()
    np.testing.assert_array_equal(frames[:, 0, 0, 0], want)
    assert DreamVectorEnv(num_envs=1, **kwargs(s)).render() is None


def rollout(env, seed, steps=15):
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(7)
    out = [obs]
    for _ in range(steps):
        obs, r, *_ = env.step(rng.uniform([-1, 0, 0], [1, 1, 1], (2, 3)).astype(np.float32))
        out += [obs, r]
    return out


def test_dream_is_deterministic_for_a_fixed_seed(model):
    s = model.stepper()
    a = rollout(DreamVectorEnv(num_envs=2, **kwargs(s, max_steps=50)), seed=3)
    b = rollout(DreamVectorEnv(num_envs=2, **kwargs(s, max_steps=50)), seed=3)
    c = rollout(DreamVectorEnv(num_envs=2, **kwargs(s, max_steps=50)), seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_temperature_zero_draws_nothing(model):
    """A cold dream from the same starts is the same whatever the generator."""
    s = model.stepper()
    st = starts(s)
    idx = torch.tensor([0, 3])
    runs = []
    for g_seed in (1, 2):
        env = DreamVectorEnv(num_envs=2, **kwargs(s, dream=DreamConfig(temperature=0.0)))
        env.reset(seed=0)
        env.z, env.state = st.take(idx)
        env._generator.manual_seed(g_seed)
        runs.append([env.step(np.full((2, 3), 0.5, np.float32))[0] for _ in range(6)])
    for x, y in zip(*runs):
        np.testing.assert_array_equal(x, y)
    warm = DreamVectorEnv(num_envs=2, **kwargs(s, dream=DreamConfig(temperature=1.0)))
    warm.reset(seed=0)
    warm.z, warm.state = st.take(idx)
    assert not np.array_equal(warm.step(np.full((2, 3), 0.5, np.float32))[0], runs[0][0])


def test_a_restarted_row_runs_from_a_bank_start_as_a_rollout_of_its_own(model):
    """The vector env restarts sub-envs at any step; that row then dreams from one of the bank's
    starts exactly as a dream of it alone would, the others going on."""
    s = model.stepper()
    cold = DreamConfig(temperature=0.0, end_threshold=1.0)
    env = DreamVectorEnv(num_envs=3, **kwargs(s, dream=cold))
    env.reset(seed=0)
    act = np.full((3, 3), 0.3, np.float32)
    for _ in range(6):  # past the Transformer's window of 4
        env.step(act)
    env._restart(np.array([False, True, False]))
    j = next(j for j in range(len(env.starts)) if torch.equal(env.starts.z[j], env.z[1]))
    torch.testing.assert_close(s.features(env.state)[1], s.features(env.starts.state)[j])
    assert env.t.tolist() == [6, 0, 6]
    z, state = env.starts.take(torch.tensor([j]))
    for _ in range(7):
        obs = env.step(act)[0]
        alone = s.step(state, z, torch.as_tensor(act[:1]), 0.0)
        z, state = alone.z, alone.state
        want = torch.cat([z, s.features(state)], dim=-1)[0].numpy()
        np.testing.assert_allclose(obs[1], want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- batched dreams


def random_policy(F, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(Z + F, 3, generator=g)

    def policy(z, h):
        return torch.tanh(torch.cat([z, h], dim=-1) @ w)

    return policy


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.15])
def test_batched_population_returns_match_the_vector_env(model, temperature):
    """The fast path CMA-ES uses gives the same returns, and the same ends, as stepping the
    gymnasium env: each rollout's rewards up to and including the step that ended it."""
    scale, bias = ENDING[type(model).__name__]
    with torch.no_grad():  # ends on some rows, at different steps, and not on others
        model.heads.done.weight.mul_(scale)
        model.heads.done.bias.fill_(bias)
    s = model.stepper()
    st = starts(s)
    spec = ControllerSpec(z_dim=Z, hidden=s.feature_dim)
    P, N, T = 3, 2, 12
    params = torch.randn(P, spec.n_params)
    ctrl = BatchController(params, spec)
    idx = torch.tensor([0, 1] * P)

    def policy(z, h):
        return ctrl(controller_obs(z, h, spec).view(P, N, -1)).view(P * N, -1)

    dream = DreamConfig(temperature=temperature)
    z, state = st.take(idx)
    fast, ended = dream_rollouts(s, policy, z, state, T, dream, torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        dream_returns(s, policy, st, idx, T, dream, torch.Generator().manual_seed(5)), fast
    )
    # Same rollouts through the env API: start states forced, same generator stream.
    env = DreamVectorEnv(num_envs=P * N, **kwargs(s, dream=dream, max_steps=T))
    env.reset(seed=0)
    env.z, env.state = st.take(idx)
    env._generator.manual_seed(5)
    total, done = np.zeros(P * N), np.zeros(P * N, bool)
    obs = env._obs()
    for _ in range(T):
        o = torch.as_tensor(obs).view(P, N, -1)
        obs, r, term, trunc, _ = env.step(ctrl(o).reshape(P * N, 3).numpy())
        total += np.where(done, 0.0, r)
        done |= term
    np.testing.assert_allclose(fast.numpy(), total, rtol=1e-5, atol=1e-5)
    assert ended.tolist() == done.tolist()
    if temperature > 0:  # the comparison did cover rollouts that end and ones that do not
        assert 0 < done.sum() < P * N


def test_dream_returns_are_deterministic_for_a_fixed_seed(model):
    s = model.stepper()
    st = starts(s)
    idx = torch.arange(6)
    dream = DreamConfig(temperature=1.0)

    def run(seed):
        policy = random_policy(s.feature_dim)
        return dream_returns(s, policy, st, idx, 20, dream, torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


class EndsAt:
    """A stepper whose rollouts end at given steps (1-based), its rewards M's; counts steps."""

    def __init__(self, inner, ends):
        self.inner, self.ends, self.calls = inner, torch.as_tensor(ends), 0
        self.z_dim, self.action_dim = inner.z_dim, inner.action_dim
        self.feature_dim = inner.feature_dim

    def initial_state(self, batch):
        return self.inner.initial_state(batch)

    def observe(self, state, z, action):
        return self.inner.observe(state, z, action)

    def features(self, state):
        return self.inner.features(state)

    def step(self, state, z, action, temperature, generator=None):
        self.calls += 1
        s = self.inner.step(state, z, action, temperature, generator)
        end = (self.ends == self.calls).float()  # (B,)
        return WorldStep(s.z, s.reward, end, s.state)


def test_rollouts_stop_collecting_reward_after_their_end(model):
    s = model.stepper()
    st = starts(s)
    idx = torch.arange(4)
    policy = random_policy(s.feature_dim)
    dream = DreamConfig(temperature=1.0)
    # Reference rewards per step: the same draws, nothing ending.
    ref = EndsAt(s, [0, 0, 0, 0])
    z, state = st.take(idx)
    g = torch.Generator().manual_seed(3)
    rewards = []
    for _ in range(10):
        out = ref.step(state, z, policy(z, s.features(state)), 1.0, g)
        rewards.append(out.reward)
        z, state = out.z, out.state
    rewards = torch.stack(rewards, dim=1)  # (4, 10)
    # Rollouts ending after 1, 3 and 7 steps, and one not within 10: their rewards up to then.
    ends = EndsAt(s, [1, 3, 7, 99])
    z, state = st.take(idx)
    total, ended = dream_rollouts(
        ends, policy, z, state, 10, dream, torch.Generator().manual_seed(3)
    )
    want = torch.stack([rewards[0, :1].sum(), rewards[1, :3].sum(), rewards[2, :7].sum()])
    torch.testing.assert_close(total[:3], want)
    torch.testing.assert_close(total[3], rewards[3].sum())
    assert ended.dtype == torch.bool and ended.tolist() == [True, True, True, False]
    # An end on the last step counts; once every rollout has ended the dream stops.
    last = EndsAt(s, [2, 5, 5, 5])
    z, state = st.take(idx)
    _, ended = dream_rollouts(last, policy, z, state, 5, dream, torch.Generator().manual_seed(3))
    assert ended.all()
    assert last.calls == 5
    again = EndsAt(s, [2, 5, 5, 5])
    z, state = st.take(idx)
    dream_rollouts(again, policy, z, state, 50, dream, torch.Generator().manual_seed(3))
    assert again.calls == 5


def test_end_reward_is_charged_in_expectation_in_rollouts_and_vector_envs(model):
    """dream.end_reward x M's end probability joins every dreamed step's reward, the same in
    the population's rollouts and in the gymnasium env."""
    s = model.stepper()
    st = starts(s)
    policy = random_policy(s.feature_dim)
    never = DreamConfig(temperature=1.0, end_threshold=1.0)
    charged = DreamConfig(temperature=1.0, end_threshold=1.0, end_reward=-100.0)
    z, state = st.take(torch.arange(4))
    g = torch.Generator().manual_seed(3)
    want = torch.zeros(4)
    for _ in range(6):
        out = s.step(state, z, policy(z, s.features(state)), 1.0, g)
        want += out.reward - 100.0 * out.end_prob
        z, state = out.z, out.state
    got = [
        dream_rollouts(
            s, policy, *st.take(torch.arange(4)), 6, d, torch.Generator().manual_seed(3)
        )[0]
        for d in (charged, never)
    ]
    torch.testing.assert_close(got[0], want)
    assert (got[0] < got[1]).all()  # every step's end probability is above 0
    envs = [DreamVectorEnv(num_envs=2, **kwargs(s, dream=d)) for d in (charged, never)]
    for env in envs:
        env.reset(seed=1)
    a = np.zeros((2, 3), np.float32)
    (_, r_charged, *_), (_, r_plain, *_) = (env.step(a) for env in envs)
    assert (r_charged < r_plain).all()


def test_survival_weighs_each_reward_by_the_chance_the_dream_still_runs(model):
    s = model.stepper()
    st = starts(s)
    policy = random_policy(s.feature_dim)
    dream = DreamConfig(temperature=1.0, end_threshold=1.0, end_reward=-10.0, survival=True)
    z, state = st.take(torch.arange(4))
    g = torch.Generator().manual_seed(3)
    want, still = torch.zeros(4), torch.ones(4)
    for _ in range(6):
        out = s.step(state, z, policy(z, s.features(state)), 1.0, g)
        want += still * (out.reward - 10.0 * out.end_prob)
        still *= 1.0 - out.end_prob
        z, state = out.z, out.state
    z, state = st.take(torch.arange(4))
    got, _ = dream_rollouts(s, policy, z, state, 6, dream, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)
    env = DreamVectorEnv(num_envs=2, **kwargs(s, dream=dream))
    env.reset(seed=1)
    first = [env.step(np.zeros((2, 3), np.float32))[1] for _ in range(2)]
    plain = DreamVectorEnv(
        num_envs=2, **kwargs(s, dream=dataclasses.replace(dream, survival=False))
    )
    plain.reset(seed=1)
    ref = [plain.step(np.zeros((2, 3), np.float32))[1] for _ in range(2)]
    np.testing.assert_allclose(first[0], ref[0], rtol=1e-6)  # nothing has ended before step 1
    assert (np.abs(first[1]) < np.abs(ref[1])).all()  # step 2 is weighed by 1 - p of step 1


def test_the_end_head_ends_dreams_and_vector_envs(kind):
    model = build(kind)
    with torch.no_grad():
        model.heads.done.bias.fill_(100.0)  # every step ends its episode
    s = model.stepper()
    st = starts(s)
    idx = torch.arange(6)
    policy = random_policy(s.feature_dim)
    dream = DreamConfig(temperature=1.0)
    z, state = st.take(idx)
    first = s.step(state, z, policy(z, s.features(state)), 1.0, torch.Generator().manual_seed(0))
    assert (first.end_prob > 0.99).all()
    z, state = st.take(idx)
    total, ended = dream_rollouts(s, policy, z, state, 10, dream, torch.Generator().manual_seed(0))
    torch.testing.assert_close(total, first.reward)
    assert ended.all()
    env = DreamVectorEnv(num_envs=2, **kwargs(s))
    env.reset(seed=0)
    _, _, terminated, truncated, _ = env.step(np.zeros((2, 3), np.float32))
    assert terminated.all() and not truncated.any()
    _, reward, terminated, _, _ = env.step(np.zeros((2, 3), np.float32))  # the autoreset step
    assert (reward == 0).all() and not terminated.any()
    # Above the threshold only: with end_threshold 1 nothing ends.
    z, state = st.take(idx)
    _, ended = dream_rollouts(s, policy, z, state, 3, NEVER_ENDS, torch.Generator().manual_seed(0))
    assert not ended.any()


def test_dream_returns_without_reward_and_done_heads_are_zero(kind):
    model = build(kind, reward_head=False, done_head=False)
    s = model.stepper()
    st = starts(s)
    z, state = st.take(torch.arange(6))
    total, ended = dream_rollouts(s, random_policy(s.feature_dim), z, state, 5, DreamConfig())
    assert torch.equal(total, torch.zeros(6)) and not ended.any()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dream_fitness_is_the_mean_return_under_batch_controller(model, temperature):
    """DreamFitness's own controller maths act exactly as BatchController does."""
    s = model.stepper()
    st = starts(s)
    spec = ControllerSpec(z_dim=Z, hidden=s.feature_dim)
    P, N, T = 3, 4, 12
    dream = DreamConfig(temperature=temperature)
    cfg = SimpleNamespace(seed=0, trials=N, dream_steps=T, dream=dream)
    params = np.random.default_rng(0).normal(0, 0.3, (P, spec.n_params))
    got = DreamFitness(s, st, spec, cfg, torch.device("cpu"))(params, 5)
    assert got.shape == (P,)
    # The reference: the same generator stream, start states and BatchController as the policy.
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([0, 5, 7]).generate_state(1)[0]))
    idx = torch.randint(0, len(st), (N,), generator=g).repeat(P)
    ctrl = BatchController(params, spec)

    def policy(z, h):
        return ctrl(controller_obs(z, h, spec).view(P, N, -1)).view(P * N, -1)

    want = dream_returns(s, policy, st, idx, T, dream, g).view(P, N).mean(dim=1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    # More trials: another estimate of the same candidates.
    assert DreamFitness(s, st, spec, cfg, torch.device("cpu"))(params, 5, trials=2).shape == (P,)


def test_ended_dreams_report_their_episode_statistics(model):
    """info["episode"] as gymnasium's RecordEpisodeStatistics writes it, from the env itself."""
    s = model.stepper()
    env = DreamVectorEnv(num_envs=2, **kwargs(s, max_steps=3, dream=NEVER_ENDS))
    env.reset(seed=0)
    total = np.zeros(2)
    for t in range(3):
        _, r, _, trunc, info = env.step(np.full((2, 3), 0.5, np.float32))
        total += r
        assert ("episode" in info) == (t == 2)
    assert trunc.all() and info["_episode"].tolist() == [True, True]
    np.testing.assert_allclose(info["episode"]["r"], total)
    assert info["episode"]["l"].tolist() == [3, 3] and (info["episode"]["t"] >= 0).all()
    single = DreamEnv(**kwargs(s, max_steps=2, dream=NEVER_ENDS))
    single.reset(seed=0)
    r0 = single.step(np.full(3, 0.5, np.float32))[1]
    _, r1, _, _, info = single.step(np.full(3, 0.5, np.float32))
    assert info["episode"]["l"] == 2 and isinstance(info["episode"]["r"], float)
    assert info["episode"]["r"] == pytest.approx(r0 + r1)
