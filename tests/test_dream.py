from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from gen_core.mdnrnn import MDNRNN, MDNRNNConfig
from worldmodels.controller import BatchController, ControllerSpec, controller_obs
from worldmodels.dream import (
    DREAM_ENV_ID,
    DreamEnv,
    DreamVectorEnv,
    StartStates,
    dream_returns,
    dream_step,
)
from worldmodels.train_controller import DreamFitness

Z, H = 4, 8


def model(seed=0):
    torch.manual_seed(seed)
    return MDNRNN(MDNRNNConfig(z_dim=Z, action_dim=3, hidden=H, n_mixtures=2))


def starts(m, n=6):
    rng = np.random.default_rng(0)
    eps = [
        {
            "mu": rng.normal(size=(30, Z)).astype(np.float32),
            "actions": rng.uniform(0, 1, (29, 3)).astype(np.float32),
        }
        for _ in range(3)
    ]
    return StartStates.from_episodes(m, eps, n, warmup=5, max_start=10, seed=1)


def kwargs(m, **kw):
    return dict(model=m, start_states=starts(m), action_low=[-1, 0, 0], action_high=[1, 1, 1], **kw)


def test_start_states_carry_real_warmup_context():
    m = model()
    s = starts(m)
    assert s.z.shape == (6, Z) and s.h.shape == s.c.shape == (6, H)
    assert s.h.abs().sum() > 0  # h was filled by running M over real steps
    cold = StartStates.from_episodes(
        m, [{"mu": np.zeros((5, Z), np.float32), "actions": np.zeros((4, 3), np.float32)}], 2
    )
    assert torch.equal(cold.h, torch.zeros(2, H))


def test_start_states_with_whole_episode_context_match_running_m_from_the_start():
    m = model()
    rng = np.random.default_rng(0)
    eps = [
        {
            "mu": rng.normal(size=(T + 1, Z)).astype(np.float32),
            "actions": rng.uniform(0, 1, (T, 3)).astype(np.float32),
        }
        for T in (29, 12, 40)
    ]
    s = StartStates.from_episodes(m, eps, 9, warmup=3, max_start=None, seed=2, context="episode")
    w = StartStates.from_episodes(m, eps, 9, warmup=3, max_start=None, seed=2)
    assert torch.equal(s.z, w.z)  # the same start points; only the memory differs
    for i in range(9):
        # Which (episode, step) start i is: its z, found in the episodes.
        (e, t), *_ = [
            (e, t)
            for e, ep in enumerate(eps)
            for t in range(len(ep["mu"]))
            if np.array_equal(ep["mu"][t], s.z[i].numpy())
        ]
        ref = m(
            torch.as_tensor(eps[e]["mu"][None, :t]), torch.as_tensor(eps[e]["actions"][None, :t])
        )
        torch.testing.assert_close(s.h[i], ref.state[0][0, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.c[i], ref.state[1][0, 0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(s.h, w.h)
    with pytest.raises(ValueError, match="context"):
        StartStates.from_episodes(m, eps, 2, context="all")


def test_single_dream_passes_gymnasium_env_checker():
    env = DreamEnv(**kwargs(model(), max_steps=20))
    check_env(env, skip_render_check=True)


def test_vector_dream_api_spaces_and_autoreset():
    env = gym.make_vec(
        DREAM_ENV_ID,
        num_envs=3,
        vectorization_mode="vector_entry_point",
        **kwargs(model(), max_steps=4),
    )
    assert isinstance(env, DreamVectorEnv)
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, Z + H) and env.observation_space.contains(obs)
    for _ in range(4):
        obs, r, term, trunc, _ = env.step(env.action_space.sample())
        assert obs.shape == (3, Z + H) and r.shape == term.shape == trunc.shape == (3,)
        assert r.dtype == np.float64 and term.dtype == np.bool_
    assert trunc.all()  # time limit after 4 steps
    obs, r, term, trunc, _ = env.step(env.action_space.sample())  # next-step autoreset
    assert (r == 0).all() and not term.any() and not trunc.any()


def rollout(env, seed, steps=15):
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(7)
    out = [obs]
    for _ in range(steps):
        obs, r, *_ = env.step(rng.uniform([-1, 0, 0], [1, 1, 1], (2, 3)).astype(np.float32))
        out += [obs, r]
    return out


def test_dream_is_deterministic_for_a_fixed_seed():
    m = model()
    a = rollout(DreamVectorEnv(num_envs=2, **kwargs(m, max_steps=50)), seed=3)
    b = rollout(DreamVectorEnv(num_envs=2, **kwargs(m, max_steps=50)), seed=3)
    c = rollout(DreamVectorEnv(num_envs=2, **kwargs(m, max_steps=50)), seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_temperature_zero_is_deterministic_whatever_the_seed():
    m = model()
    a = rollout(DreamVectorEnv(num_envs=2, **kwargs(m, temperature=0.0)), seed=3)
    b = rollout(DreamVectorEnv(num_envs=2, **kwargs(m, temperature=0.0)), seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.15])
def test_batched_population_returns_match_the_vector_env(temperature):
    """The fast path CMA-ES uses gives the same returns as stepping the gymnasium env."""
    m = model()
    s = starts(m)
    spec = ControllerSpec(z_dim=Z, hidden=H)
    P, N, T = 3, 2, 12
    params = torch.randn(P, spec.n_params)
    ctrl = BatchController(params, spec)
    idx = torch.tensor([0, 1] * P)

    def policy(z, h):
        return ctrl(controller_obs(z, h, spec).view(P, N, -1)).view(P * N, -1)

    g = torch.Generator().manual_seed(5)
    fast = dream_returns(m, policy, s, idx, T, temperature, generator=g)
    # Same rollouts through the env API: start states forced, same generator stream.
    env = DreamVectorEnv(num_envs=P * N, **kwargs(m, temperature=temperature, max_steps=T))
    env.reset(seed=0)
    env.z, env.h, env.c = s.take(idx)
    env._generator.manual_seed(5)
    total = np.zeros(P * N)
    obs = env._obs()
    for _ in range(T):
        o = torch.as_tensor(obs).view(P, N, -1)
        obs, r, term, trunc, _ = env.step(ctrl(o).reshape(P * N, 3).numpy())
        total += r
    np.testing.assert_allclose(fast.numpy(), total, rtol=1e-5, atol=1e-5)


def random_policy(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(Z + H, 3, generator=g)

    def policy(z, h):
        return torch.tanh(torch.cat([z, h], dim=-1) @ w)

    return policy


def test_dream_returns_are_deterministic_for_a_fixed_seed():
    m = model()
    s = starts(m)
    idx = torch.arange(6)

    def run(seed):
        return dream_returns(
            m, random_policy(), s, idx, 20, 1.0, torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def ending_at_once():
    """M whose done head fires on every rollout's first step, its starts and their indices."""
    m = model()
    with torch.no_grad():
        m.done.bias.fill_(100.0)
    return m, starts(m), torch.arange(6)


def test_dream_returns_stop_collecting_reward_once_done_fires():
    m, s, idx = ending_at_once()
    g = torch.Generator().manual_seed(0)
    returns = dream_returns(m, random_policy(), s, idx, 10, 1.0, g)
    z, h, c = s.take(idx)
    first = dream_step(m, z, h, c, random_policy()(z, h), 1.0, torch.Generator().manual_seed(0))
    assert first.done.all()
    torch.testing.assert_close(returns, first.reward)


def test_a_dream_ended_by_the_done_head_pays_ms_done_reward():
    m, s, idx = ending_at_once()
    z, h, c = s.take(idx)
    action = random_policy()(z, h)
    before = dream_step(m, z, h, c, action, 1.0, torch.Generator().manual_seed(0))
    m.config.done_reward = -100.0
    after = dream_step(m, z, h, c, action, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(after.reward, before.reward - 100.0)
    returns = dream_returns(m, random_policy(), s, idx, 10, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(returns, after.reward)
    with torch.no_grad():
        m.done.bias.fill_(-100.0)  # no rollout ends: no done reward
    no_end = dream_returns(m, random_policy(), s, idx, 1, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(no_end, before.reward, atol=1e-4, rtol=0)
    env = DreamVectorEnv(**kwargs(m), num_envs=2)
    with torch.no_grad():
        m.done.bias.fill_(100.0)
    env.reset(seed=0)
    _, reward, terminated, _, _ = env.step(np.zeros((2, 3), np.float32))
    assert terminated.all() and (reward < -90).all()


def test_dream_returns_without_reward_and_done_heads_are_zero():
    torch.manual_seed(0)
    m = MDNRNN(
        MDNRNNConfig(
            z_dim=Z, action_dim=3, hidden=H, n_mixtures=2, reward_head=False, done_head=False
        )
    )
    s = starts(m)
    out = dream_returns(m, random_policy(), s, torch.arange(6), 5, 1.0)
    assert torch.equal(out, torch.zeros(6))


def test_dream_fitness_bf16_option_stays_close_to_float32():
    """bfloat16 matmuls are an opt-in speed option: the cold (tau 0) dream barely moves."""
    m = model()
    spec = ControllerSpec(z_dim=Z, hidden=H)
    # no early ends (threshold above 1): compare whole rollouts
    cfg = SimpleNamespace(seed=0, trials=4, dream_steps=10, temperature=0.0, done_threshold=1.1)
    params = np.random.default_rng(0).normal(0, 0.3, (3, spec.n_params))
    f32 = DreamFitness(m, starts(m), spec, cfg, torch.device("cpu"))(params, 0)
    bf16 = DreamFitness(m, starts(m), spec, cfg, torch.device("cpu"), dtype=torch.bfloat16)
    np.testing.assert_allclose(bf16(params, 0), f32, atol=0.05 * np.abs(f32).max() + 1e-3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dream_fitness_is_the_mean_return_under_batch_controller(temperature):
    """DreamFitness's own controller maths act exactly as BatchController does."""
    m = model()
    s = starts(m)
    spec = ControllerSpec(z_dim=Z, hidden=H)
    P, N, T = 3, 4, 12
    cfg = SimpleNamespace(
        seed=0, trials=N, dream_steps=T, temperature=temperature, done_threshold=0.5
    )
    params = np.random.default_rng(0).normal(0, 0.3, (P, spec.n_params))
    got = DreamFitness(m, s, spec, cfg, torch.device("cpu"))(params, 5)
    # The reference: the same generator stream, start states and BatchController as the policy.
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([0, 5, 7]).generate_state(1)[0]))
    idx = torch.randint(0, len(s), (N,), generator=g).repeat(P)
    ctrl = BatchController(params, spec)

    def policy(z, h):
        return ctrl(controller_obs(z, h, spec).view(P, N, -1)).view(P * N, -1)

    want = dream_returns(m, policy, s, idx, T, temperature, g, 0.5).view(P, N).mean(dim=1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
