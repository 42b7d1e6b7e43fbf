"""`wm fidelity` on a toy env and toy dream models whose answers are known.

The toy car: state (position x, velocity v); under [steer, gas, brake]
v' = 0.9 v + gas - 0.5 brake v, x' = x + v', reward v' - 0.1 - 0.1 |steer| - 0.05 steer, never
done. Its observation is the state, V is the identity, and a "perfect" toy M (a `StepModel`)
steps exactly these dynamics on z, so the dream must reproduce the real returns; a dream that
ignores the action must not rank the policies at all. The walled car is the same car on a road
that ends at x = WALL: driving past it terminates the episode with -100 (as leaving CarRacing's
playfield does), so policies differ in how often they end, and a perfect dream of it must foresee
the same ends.
"""

import json
import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from PIL import Image

from gen_core.errors import UserError
from gen_core.mdn import BatchState, WorldStep
from gen_core.mdnrnn import MDNRNN, MDNRNNConfig
from gen_core.plots import COLOURS, scatter_chart
from rollouts.policies import ExplorePolicy, make_policy
from worldmodels.cli import main as wm
from worldmodels.dream import DreamConfig, DreamStarts, dream_rollouts
from worldmodels.fidelity import (
    FIXED_POLICIES,
    FidelityConfig,
    FidelityResult,
    FidelityWorker,
    _cache_key,
    _cached_real,
    dream_returns_for,
    fixed_policy,
    measure_fidelity,
    open_loop_errors,
    pearson,
    pick_candidates,
    play_from_warmup,
    policy_strip,
    real_returns,
    reward_response,
    search_agreement,
    spearman,
    starts_from_frames,
)

HIDDEN = 4
WARMUP, HORIZON = 5, 60  # real warm-up steps before a policy drives (start_step), its steps
DREAM = DreamConfig(temperature=1.0, warmup=3, end_threshold=0.5)
WARMUP_ACTION = (0.0, 0.5, 0.0)
SEEDS = [10, 11, 12, 13]
CAR_RACING_ACTIONS = spaces.Box(
    np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32), dtype=np.float32
)
CONSTANT = [n for n, (kind, _) in FIXED_POLICIES.items() if kind == "constant"]


class ToyCar(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.action_space = CAR_RACING_ACTIONS
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.x = self.v = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.v = 0.0, float(self.np_random.uniform(0.0, 2.0))
        return self._obs(), {}

    def _obs(self):
        return np.array([self.x, self.v], np.float32)

    def step(self, action):
        steer, gas, brake = (float(a) for a in action)
        self.v = 0.9 * self.v + gas - 0.5 * brake * self.v
        self.x += self.v
        reward = self.v - 0.1 - 0.1 * abs(steer) - 0.05 * steer
        return self._obs(), reward, False, False, {}


WALL = 290.0  # gas 0.5 passes it on tracks 10 and 13 only, full gas on all, stop on none


class WalledCar(ToyCar):
    def step(self, action):
        obs, reward, _, truncated, info = super().step(action)
        terminated = self.x > WALL
        return obs, reward - 100.0 * terminated, terminated, truncated, info


def encode(frames):
    return torch.as_tensor(np.stack(frames))  # V = identity: (W + 1, 2)


def car(z, action):
    """The toy car's step on latents z = (x, v): (next z, reward)."""
    steer, gas, brake = action[:, 0], action[:, 1], action[:, 2]
    v = 0.9 * z[:, 1] + gas - 0.5 * brake * z[:, 1]
    x = z[:, 0] + v
    return torch.stack([x, v], dim=1), v - 0.1 - 0.1 * steer.abs() - 0.05 * steer


@dataclass
class ToyState(BatchState):
    h: torch.Tensor  # (B, HIDDEN): real steps read, their gas summed, the next z predicted


class ToyModel:
    """A toy M on the step protocol: `dynamics` says what a step draws; the state records what
    was read (so tests can check which steps a start read) and the z the model expects next."""

    z_dim, action_dim, feature_dim = 2, 3, HIDDEN

    def initial_state(self, batch):
        return ToyState(torch.zeros(batch, HIDDEN))

    def features(self, state):
        return state.h

    def observe(self, state, z, action):
        h = state.h.clone()
        h[:, 0] += 1
        h[:, 1] += action[:, 1]
        h[:, 2:4] = car(z, action)[0]
        return ToyState(h)

    def step(self, state, z, action, temperature, generator=None):
        z_next, reward, end = self.dynamics(state, z, action, generator)
        after = self.observe(state, z, action)
        after.h[:, 2:4] = z_next
        return WorldStep(z_next, reward, end.float(), after)

    def dynamics(self, state, z, action, generator):
        raise NotImplementedError


class Perfect(ToyModel):
    def dynamics(self, state, z, action, generator):
        z_next, reward = car(z, action)
        return z_next, reward, torch.zeros(len(z))


class Walled(ToyModel):
    def dynamics(self, state, z, action, generator):
        z_next, reward = car(z, action)
        end = z_next[:, 0] > WALL  # (B,)
        return z_next, reward - 100.0 * end, end


class Noisy(ToyModel):
    """Perfect dynamics plus Gaussian noise on z each step (drawn from the generator)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def dynamics(self, state, z, action, generator):
        z_next, reward = car(z, action)
        noise = torch.randn(z_next.shape, generator=generator)
        return z_next + self.sigma * noise, reward, torch.zeros(len(z))


class ActionBlind(ToyModel):
    """Drives as if the gas were always 0.5, whatever the action; optionally noisy."""

    def __init__(self, sigma=0.0):
        self.sigma = sigma

    def dynamics(self, state, z, action, generator):
        v = 0.9 * z[:, 1] + 0.5
        if self.sigma:
            v = v + self.sigma * torch.randn(v.shape, generator=generator)
        return torch.stack([z[:, 0] + v, v], dim=1), v - 0.1, torch.zeros(len(z))


class Memory(ToyModel):
    """Perfect dynamics run from the model's memory of where the car is, never from the z it is
    given: right only if every start's state is the one read for that start and each step's
    state is carried to the next."""

    def dynamics(self, state, z, action, generator):
        z_next, reward = car(state.h[:, 2:4], action)
        return z_next, reward, torch.zeros(len(z))


class Counter(ToyModel):
    """Reward 1 a step; a dream from z ends after z[0] + 1 steps."""

    def dynamics(self, state, z, action, generator):
        z = z - 1
        return z, torch.ones(len(z)), z[:, 0] < 0


class Coin(ToyModel):
    """Each dream ends at any step with probability 0.3."""

    def dynamics(self, state, z, action, generator):
        return z, torch.zeros(len(z)), torch.rand(len(z), generator=generator) < 0.3


def toy_starts(z):
    return DreamStarts(torch.as_tensor(z, dtype=torch.float32), ToyModel().initial_state(len(z)))


def fidelity(model, env=ToyCar, **kw):
    policies = [fixed_policy(n) for n in FIXED_POLICIES]
    args = dict(start_step=WARMUP, warmup_action=WARMUP_ACTION, horizon=HORIZON, dream_samples=8)
    return measure_fidelity(model, DREAM, encode, env, policies, SEEDS, **{**args, **kw})


@pytest.fixture(scope="module")
def perfect():
    return fidelity(Perfect())


# ---------------------------------------------------------------------------------- statistics


def test_rank_and_linear_correlation_against_hand_computed_values():
    # Ties get their average rank: [1, 2.5, 2.5, 4] against [1, 3, 2, 4] is sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)  # monotone
    assert spearman([1, 2, 3, 4], [9, 5, 2, -7]) == pytest.approx(-1.0)
    assert spearman([3, 1, 2], [30, 20, 10]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 2, 3, 4], [1, 10, 100, 1000]) < 0.9  # not a straight line
    # A side that does not vary carries no ranking information: 0, not nan.
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0
    assert pearson([1, 2, 3], [7, 7, 7]) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30), rng.normal(size=30)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])


def test_result_summary_table_and_markdown():
    dream = np.array([[1.0, 3.0], [5.0, 5.0], [2.0, 4.0]])
    real = np.array([[0.0, 0.0], [10.0, 12.0], [4.0, 6.0]])
    r = FidelityResult(["a", "b", "c"], dream, real, {"note": 1})
    np.testing.assert_allclose(r.gap, [2.0, -6.0, -2.0])
    assert r.spearman == pytest.approx(1.0) and -1 < r.pearson < 1
    s = r.summary()
    assert s["spearman"] == 1.0 and s["policies"] == 3
    assert s["mean_abs_gap"] == pytest.approx(10 / 3, abs=0.01)
    assert (s["dream_a"], s["real_a"], s["dream_b"], s["real_b"]) == (2.0, 0.0, 5.0, 11.0)
    assert s["note"] == 1
    rows = r.table()
    assert [row["policy"] for row in rows] == ["a", "b", "c"]
    assert rows[0] == {
        "policy": "a",
        "dream_mean": 2.0,
        "dream_std": 1.0,
        "real_mean": 0.0,
        "real_std": 0.0,
        "gap": 2.0,
    }
    md = r.markdown()
    assert "| b | 5.0 ± 0.0 | 11.0 ± 1.0 | -6.0 |" in md
    assert "Spearman 1.000" in md and "3 policies" in md


def test_result_reports_end_rates_when_measured():
    dream, real = np.array([[1.0, 3.0], [5.0, 5.0]]), np.array([[0.0, 0.0], [10.0, 12.0]])
    dream_ended = np.array([[0.25, 0.75], [0.0, 0.0]])  # fractions of a start's dreams
    real_ended = np.array([[1.0, 1.0], [0.0, 1.0]])
    r = FidelityResult(["a", "b"], dream, real, {}, dream_ended, real_ended)
    s = r.summary()
    assert (s["dream_end_a"], s["real_end_a"], s["dream_end_b"], s["real_end_b"]) == (
        0.5,
        1.0,
        0.0,
        0.5,
    )
    rows = r.table()
    assert (rows[0]["dream_end_rate"], rows[0]["real_end_rate"]) == (0.5, 1.0)
    assert (rows[1]["dream_end_rate"], rows[1]["real_end_rate"]) == (0.0, 0.5)
    md = r.markdown()
    assert "| dream − real | dream ends | real ends |" in md
    assert "| --- | --- | --- | --- | --- | --- |" in md
    assert "| a | 2.0 ± 1.0 | 0.0 ± 0.0 | +2.0 | 50% | 100% |" in md
    assert "| b | 5.0 ± 0.0 | 11.0 ± 1.0 | -6.0 | 0% | 50% |" in md
    # Splitting keeps each policy's rows; the extra figures stay with the first part.
    r.extra["note"] = 1
    head, tail = r.split(1)
    assert head.names == ["a"] and tail.names == ["b"] and head.extra == {"note": 1}
    assert tail.extra == {} and tail.table() == rows[1:] and head.table() == rows[:1]
    # Without ends (e.g. real returns passed in alone) only the measured side is reported.
    dream_only = FidelityResult(["a", "b"], dream, real, {}, dream_ended)
    assert "dream_end_a" in dream_only.summary() and "real_end_a" not in dream_only.summary()
    assert "real_end_rate" not in dream_only.table()[0]
    assert "dream ends |" in dream_only.markdown() and "real ends" not in dream_only.markdown()
    plain = FidelityResult(["a", "b"], dream, real)
    assert not any("_end_" in k for k in plain.summary()) and "ends" not in plain.markdown()


def test_fixed_policies_and_unknown_names():
    assert fixed_policy("full_gas").action == (0.0, 1.0, 0.0)
    assert fixed_policy("correlated").kind == "correlated"
    with pytest.raises(UserError, match="nope"):
        fixed_policy("nope")


# ---------------------------------------------------------------------------------- the measure


def test_search_candidates_are_picked_by_rank_within_their_generation():
    returns = [np.array([1.0, 5.0, 3.0, 2.0]), np.array([0.0, 9.0, 4.0])]
    # Default generations: spread over 1..2; two per generation: the best and the worst.
    assert pick_candidates(returns, [], 2) == [(1, 1, 1), (1, 4, 0), (2, 1, 1), (2, 3, 0)]
    assert pick_candidates(returns, [2], 3) == [(2, 1, 1), (2, 2, 2), (2, 3, 0)]
    assert pick_candidates(returns, [1], 9) == [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 0)]
    with pytest.raises(UserError, match=r"\[3\] outside the checkpoint's 1..2"):
        pick_candidates(returns, [1, 3], 2)


def test_search_agreement_separates_overall_and_within_generation_ranking():
    gens = [1, 1, 1, 2, 2, 2]
    real = [1.0, 2.0, 3.0, 11.0, 12.0, 13.0]
    # Recorded returns order generation 1 right and generation 2 backwards; across
    # generations they still put 2 above 1.
    recorded = [1.0, 2.0, 3.0, 13.0, 12.0, 11.0]
    out = search_agreement(gens, recorded, dream=real, real=real)
    assert out["candidates"] == 6 and out["spearman"] == 1.0
    assert out["within_generation"] == 0.0  # (1 + -1) / 2
    assert 0 < out["recorded_spearman"] < 1
    # Fewer than three candidates in every generation: no within-generation figure.
    assert (
        search_agreement([1, 1, 2, 2], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4])[
            "within_generation"
        ]
        is None
    )


def test_toy_env_separates_the_fixed_policies(perfect):
    assert perfect.real_ended.shape == perfect.real.shape and not perfect.real_ended.any()
    assert perfect.dream_ended.shape == perfect.dream.shape and not perfect.dream_ended.any()
    real = perfect.real_mean
    assert perfect.real.shape == (len(FIXED_POLICIES), len(SEEDS))
    gaps = np.diff(np.sort(real))
    assert gaps.min() > 5.0, dict(zip(perfect.names, real))  # no near-ties to rank by chance
    by = dict(zip(perfect.names, real))
    assert by["brake"] < by["stop"] < by["gas_0.2"] < by["gas_0.5"] < by["full_gas"]
    assert by["right"] < by["left"]


def test_perfect_model_reproduces_real_returns_and_ranking(perfect):
    spread = np.ptp(perfect.real_mean)
    for name in CONSTANT:  # deterministic policies: the dream is the real env, exactly
        i = perfect.names.index(name)
        np.testing.assert_allclose(perfect.dream[i], perfect.real[i], atol=1e-3, err_msg=name)
    constant = [perfect.names.index(n) for n in CONSTANT]
    assert spearman(perfect.dream_mean[constant], perfect.real_mean[constant]) >= 0.999
    # Random policies draw different random actions in the dream, so agree only on average.
    for name in ("random", "correlated"):
        assert abs(perfect.gap[perfect.names.index(name)]) < 0.1 * spread, name
    assert perfect.spearman >= 0.9 and perfect.pearson >= 0.95
    assert perfect.summary()["spearman"] >= 0.9
    # The dream starts where the real warm-up left each track: per-track returns differ.
    stop = perfect.names.index("stop")
    assert np.ptp(perfect.dream[stop]) > 1.0


def test_reward_response_of_the_perfect_model(perfect):
    resp = perfect.extra["reward_response"]
    assert set(resp) == {"stop", "full_gas"} and resp["full_gas"] > resp["stop"] + 5
    # Known answer: over k steps full gas earns 10 (1 - (0.9 + ... + 0.9^k) / k) a step
    # more than stopping, whatever the start speed.
    starts = toy_starts([[0.0, 0.0], [3.0, 1.5], [7.0, 4.0]])
    actions = {"stop": (0.0, 0.0, 0.0), "full_gas": (0.0, 1.0, 0.0)}
    for k in (1, 50):
        out = reward_response(Perfect(), DREAM, starts, actions, steps=k, samples=2)
        expected = 10 * (1 - 9 * (1 - 0.9**k) / k)
        assert out["full_gas"] - out["stop"] == pytest.approx(expected, abs=2e-3), k
    # Stopping from speed v earns (v 0.9 (1 - 0.9^k) / 0.1) / k - 0.1 a step: the starts' mean.
    stop = reward_response(Perfect(), DREAM, starts, {"stop": (0, 0, 0)}, steps=10)["stop"]
    assert stop == pytest.approx((0.0 + 1.5 + 4.0) / 3 * 9 * (1 - 0.9**10) / 10 - 0.1, abs=1e-3)
    blind = reward_response(ActionBlind(), DREAM, starts, actions, steps=10)
    assert blind["full_gas"] == blind["stop"]


def test_spearman_interval_is_tight_for_a_perfect_model_and_wide_for_a_coin():
    perfect_dream = np.array([[0.0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]])  # (P, tracks)
    exact = FidelityResult(["a", "b", "c"], perfect_dream, perfect_dream.copy())
    assert exact.spearman_interval() == (1.0, 1.0)
    assert exact.summary()["spearman_90"] == [1.0, 1.0]
    # Close policies whose dream returns are noise: the interval spans most of [-1, 1].
    rng = np.random.default_rng(0)
    real = np.array([[0.0] * 16, [1.0] * 16, [2.0] * 16, [3.0] * 16])
    noisy = FidelityResult(list("abcd"), rng.normal(size=(4, 16)), real)
    lo, hi = noisy.spearman_interval()
    assert lo < 0 < hi and hi - lo > 1.0
    assert noisy.spearman_interval() == (lo, hi)  # seeded: the same interval every time
    assert "90% bootstrap interval over tracks" in noisy.markdown()


def test_action_blind_model_cannot_rank(perfect):
    blind = fidelity(ActionBlind(), real=perfect.real)
    assert np.ptp(blind.dream_mean) == 0.0  # the same dream whatever the policy
    assert blind.spearman == 0.0 and blind.pearson == 0.0
    assert blind.extra["reward_response"]["full_gas"] == blind.extra["reward_response"]["stop"]
    # A noisy action-blind dream ranks the policies only by chance.
    rhos = [fidelity(ActionBlind(sigma=0.5), real=perfect.real, seed=s).spearman for s in range(8)]
    assert len(set(rhos)) > 1  # the noise does reorder the policies
    assert np.mean(np.abs(rhos)) < 0.5, rhos
    assert abs(np.mean(rhos)) < 0.35, rhos
    assert perfect.spearman - max(rhos) > 0.2


def test_dream_rollouts_stop_at_the_predicted_end():
    z0 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [50.0, 0.0]])

    def run(steps):
        state = ToyModel().initial_state(3)
        return dream_rollouts(Counter(), lambda z, h: torch.zeros(3, 3), z0, state, steps, DREAM)

    total, _ = run(10)
    assert total.tolist() == [1.0, 3.0, 10.0]
    # Ends after 1, 3 and 51 steps: within a horizon of 10 the first two end, the third does not;
    # an end on the horizon's last step counts, one a step later does not.
    for steps, ended in [(10, [True, True, False]), (3, [True, True, False]),
                         (2, [True, False, False]), (60, [True, True, True])]:  # fmt: skip
        total, end = run(steps)
        assert end.dtype == torch.bool and end.tolist() == ended, steps
        assert total.tolist() == [min(steps, n) for n in (1.0, 3.0, 51.0)], steps


def test_dream_end_rate_is_the_fraction_of_a_starts_dreams_that_ended():
    start = toy_starts([[2.0, 0.0], [50.0, 0.0]])
    stop = [fixed_policy("stop")]
    for horizon, rates in [(10, [1.0, 0.0]), (2, [0.0, 0.0]), (60, [1.0, 1.0])]:
        ret, ended = dream_returns_for(
            Counter(), DREAM, stop, start, horizon, 3, CAR_RACING_ACTIONS
        )
        assert ended.shape == (1, 2) and ended[0].tolist() == rates, horizon
        assert ret[0].tolist() == [min(horizon, 3), min(horizon, 51)], horizon
    _, ended = dream_returns_for(Coin(), DREAM, stop, start, 1, 2000, CAR_RACING_ACTIONS)
    assert np.all(np.abs(ended - 0.3) < 0.05) and np.all((ended > 0) & (ended < 1)), ended
    # The same seed gives the same dreams; another seed, others.
    again = dream_returns_for(Coin(), DREAM, stop, start, 1, 2000, CAR_RACING_ACTIONS)[1]
    other = dream_returns_for(Coin(), DREAM, stop, start, 1, 2000, CAR_RACING_ACTIONS, seed=1)[1]
    np.testing.assert_array_equal(again, ended)
    assert not np.array_equal(other, ended)


def test_dream_returns_of_each_start_come_from_its_own_state():
    """A toy M that dreams from its memory alone (never from the z it is given) reproduces the
    real returns as the perfect one does: every start reads its own warm-up, and every dream
    carries its state from step to step."""
    memory = fidelity(Memory(), real=None)
    for name in CONSTANT:
        i = memory.names.index(name)
        np.testing.assert_allclose(memory.dream[i], memory.real[i], atol=1e-2, err_msg=name)
    assert memory.spearman >= 0.9
    # Without a warm-up to read, M's memory is empty: the dream starts from a parked car.
    empty = measure_fidelity(
        Memory(),
        DreamConfig(warmup=0),
        encode,
        ToyCar,
        [fixed_policy("stop")],
        SEEDS,
        WARMUP,
        WARMUP_ACTION,
        HORIZON,
        2,
        real=memory.real[:1],
    )
    np.testing.assert_allclose(empty.dream, -0.1 * HORIZON, rtol=1e-5)  # -0.1 a step at rest


def test_real_end_is_a_termination_within_the_horizon():
    env = WalledCar()
    stop = make_policy("constant", CAR_RACING_ACTIONS, action=[0, 0, 0])
    gas = make_policy("constant", CAR_RACING_ACTIONS, action=[0, 1, 0])
    warm = np.asarray(WARMUP_ACTION, np.float32)
    open_road = play_from_warmup(ToyCar(), gas, 10, WARMUP, warm, HORIZON)
    ret, ended, frames = play_from_warmup(env, gas, 10, WARMUP, warm, HORIZON)
    assert ended is True and len(frames) == WARMUP + 1
    assert open_road[1] is False and ret < open_road[0] - 100  # the wall's -100, and stopped
    ret, ended, _ = play_from_warmup(env, stop, 10, WARMUP, warm, HORIZON)
    assert ended is False and ret == play_from_warmup(ToyCar(), stop, 10, WARMUP, warm, HORIZON)[0]
    # Full gas reaches the wall only after a while: a shorter horizon does not end.
    assert play_from_warmup(env, gas, 10, WARMUP, warm, 10)[1] is False
    # A time limit (truncation) is no end.
    limited = gym.wrappers.TimeLimit(WalledCar(), WARMUP + 10)
    assert play_from_warmup(limited, gas, 10, WARMUP, warm, HORIZON)[1] is False
    worker = FidelityWorker(WalledCar, WARMUP, WARMUP_ACTION, HORIZON)
    assert worker.play((0, fixed_policy("full_gas"), 10))[1] is True
    assert len(worker.warmup_frames(10)) == WARMUP + 1
    names = ["stop", "gas_0.5", "full_gas"]
    args = (WalledCar, WARMUP, WARMUP_ACTION, HORIZON, None)
    ret, ended = real_returns(args, [fixed_policy(n) for n in names], SEEDS)
    assert ret.shape == ended.shape == (3, len(SEEDS))
    np.testing.assert_array_equal(ended, [[0, 0, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]])
    open_ret, open_ended = real_returns(
        (ToyCar, *args[1:]), [fixed_policy(n) for n in names], SEEDS
    )
    assert not open_ended.any()
    np.testing.assert_allclose(ret[ended == 0], open_ret[ended == 0])
    assert np.all(ret[ended == 1] < open_ret[ended == 1] - 100)


def test_warmup_may_be_a_sequence_of_actions_replayed_in_turn():
    gas = make_policy("constant", CAR_RACING_ACTIONS, action=[0, 1, 0])
    warm = np.asarray(WARMUP_ACTION, np.float32)
    # A sequence repeating the fixed warm-up action reaches the same frames and return.
    same = play_from_warmup(ToyCar(), gas, 10, WARMUP, np.tile(warm, (WARMUP, 1)), HORIZON)
    fixed = play_from_warmup(ToyCar(), gas, 10, WARMUP, warm, HORIZON)
    assert same[0] == fixed[0]
    np.testing.assert_array_equal(np.stack(same[2]), np.stack(fixed[2]))
    # A lead-in that drives moves the car before the policy takes over.
    lead = np.tile(np.asarray([0, 1, 0], np.float32), (WARMUP, 1))
    _, _, frames = play_from_warmup(ToyCar(), gas, 10, WARMUP, lead, 0)
    assert len(frames) == WARMUP + 1 and not np.array_equal(frames[-1], fixed[2][-1])
    # M's teacher-forced start follows the same rule.
    model = MDNRNN(MDNRNNConfig(z_dim=4, action_dim=3, hidden=8)).stepper()
    z = [torch.randn(WARMUP + 1, 4)]
    fixed_start = starts_from_frames(model, z, warm, 8)
    tiled = starts_from_frames(model, z, np.tile(warm, (WARMUP, 1)), 8)
    torch.testing.assert_close(tiled.z, fixed_start.z)
    torch.testing.assert_close(tiled.state.h, fixed_start.state.h)
    torch.testing.assert_close(tiled.state.c, fixed_start.state.c)
    driven = starts_from_frames(model, z, lead, 8)
    torch.testing.assert_close(driven.z, z[0][-1:])
    assert not torch.allclose(driven.state.h, fixed_start.state.h)  # h remembers the actions


def test_starts_from_frames_read_the_last_warmup_steps():
    """The start is the last frame; M reads the `warmup` steps before it (all there are, if
    fewer), each frame with the action that followed it."""
    frames = [torch.arange(12.0).view(6, 2), 100 + torch.arange(12.0).view(6, 2)]  # W = 5 steps
    gas = np.zeros((5, 3), np.float32)
    gas[:, 1] = [0.1, 0.2, 0.3, 0.4, 0.5]
    for warmup, read, gas_sum in [(3, 3, 1.2), (5, 5, 1.5), (10, 5, 1.5), (0, 0, 0.0)]:
        st = starts_from_frames(Perfect(), frames, gas, warmup)
        torch.testing.assert_close(st.z, torch.stack([frames[0][-1], frames[1][-1]]))
        assert st.state.h[:, 0].tolist() == [read, read], warmup
        assert st.state.h[:, 1].tolist() == pytest.approx([gas_sum, gas_sum]), warmup
    # The toy's memory after reading: the perfect step from the frame before the start.
    st = starts_from_frames(Perfect(), frames, gas, 2)
    before = torch.stack([frames[0][-2], frames[1][-2]])
    want = car(before, torch.as_tensor(gas[-1:]).expand(2, 3))[0]
    torch.testing.assert_close(st.state.h[:, 2:4], want)


def test_perfect_model_foresees_the_real_ends():
    walled = fidelity(Walled(), env=WalledCar)
    by = dict(zip(walled.names, walled.real_ended.mean(axis=1)))
    assert (by["stop"], by["gas_0.5"], by["full_gas"]) == (0.0, 0.5, 1.0)
    for name in CONSTANT:  # deterministic: the same ends on the same tracks, and the same returns
        i = walled.names.index(name)
        np.testing.assert_array_equal(walled.dream_ended[i], walled.real_ended[i], err_msg=name)
        np.testing.assert_allclose(walled.dream[i], walled.real[i], atol=1e-3, err_msg=name)
    s = walled.summary()
    for name in CONSTANT:
        assert s[f"dream_end_{name}"] == s[f"real_end_{name}"], name
    assert s["real_end_gas_0.5"] == 0.5 and s["dream_end_full_gas"] == 1.0
    assert "dream ends | real ends |" in walled.markdown()
    # Real returns passed in without their ends: no real end rates, the dream's still there.
    again = fidelity(Walled(), env=WalledCar, real=walled.real)
    assert again.real_ended is None and "real_end_stop" not in again.summary()
    np.testing.assert_array_equal(again.dream_ended, walled.dream_ended)
    both = fidelity(Walled(), env=WalledCar, real=walled.real, real_ended=walled.real_ended)
    assert both.summary()["real_end_gas_0.5"] == 0.5


def test_real_cache_entries_from_before_ends_are_measured_again():
    cfg = FidelityConfig()
    seeds = [1, 2]
    key = _cache_key(cfg, fixed_policy("stop"), seeds)
    assert _cached_real({}, key, 2) is None
    assert _cached_real({key: [1.0, 2.0]}, key, 2) is None  # the old format: returns only
    assert _cached_real({key: {"returns": [1.0, 2.0]}}, key, 2) is None
    assert _cached_real({key: {"returns": [1.0], "ended": [0.0]}}, key, 2) is None
    entry = {"returns": [1.0, -90.0], "ended": [0.0, 1.0]}
    cache = json.loads(json.dumps({key: entry}))  # as read back from the file
    assert _cached_real(cache, key, 2) == ([1.0, -90.0], [0.0, 1.0])
    assert _cached_real(cache, None, 2) is None  # controllers are never cached


# ---------------------------------------------------------------------------------- open loop


def record_episodes(n=4, steps=120):
    env, episodes = ToyCar(), []
    for i in range(n):
        policy = make_policy("explore", env.action_space)
        policy.reset(i)
        obs, _ = env.reset(seed=100 + i)
        zs, acts, rews = [obs], [], []
        for _ in range(steps):
            a = policy(obs)
            obs, r, *_ = env.step(a)
            zs.append(obs)
            acts.append(a)
            rews.append(r)
        episodes.append(
            {
                "z": np.stack(zs),
                "actions": np.stack(acts),
                "rewards": np.array(rews, np.float32),
                "done": np.zeros(steps, np.float32),
            }
        )
    return episodes


def test_open_loop_error_grows_with_horizon_for_a_noisy_model():
    episodes = record_episodes()
    horizons = (1, 10, 50)
    exact = open_loop_errors(Perfect(), DREAM, episodes, horizons, context=10)
    assert exact["starts"] == 4 * 4
    for k in horizons:
        assert exact[f"z_mse_{k}"] == pytest.approx(0.0, abs=1e-3)
        assert exact[f"reward_mae_{k}"] == pytest.approx(0.0, abs=1e-3)
        assert exact[f"done_acc_{k}"] == 1.0
        assert exact[f"z_mse_persistence_{k}"] > 0.1  # the car does move: persistence is wrong
    noisy = open_loop_errors(Noisy(0.1), DREAM, episodes, horizons, context=10)
    err = [noisy[f"z_mse_{k}"] for k in horizons]
    assert err[0] == pytest.approx(0.1**2, abs=0.005)  # one step: just the noise, sigma^2
    assert err[0] < err[1] < err[2] and err[2] > 10 * err[1], err  # then it compounds
    assert noisy["reward_mae_1"] < noisy["reward_mae_10"] < noisy["reward_mae_50"]
    assert err[2] < noisy["z_mse_persistence_50"]  # still far better than standing still
    # The same seed gives the same diagnostics.
    assert open_loop_errors(Noisy(0.1), DREAM, episodes, horizons, context=10) == noisy
    # A model that dreams from its memory is exact only if the context it read is carried on.
    memory = open_loop_errors(Memory(), DREAM, episodes, horizons, context=10)
    assert all(memory[f"z_mse_{k}"] == pytest.approx(0.0, abs=1e-3) for k in horizons)
    with pytest.raises(UserError, match="longer than"):
        open_loop_errors(Perfect(), DREAM, episodes, (200,), context=10)


def test_open_loop_done_accuracy_scores_the_end_probability():
    episodes = record_episodes(n=1)
    ends = open_loop_errors(Coin(), DREAM, episodes, (1,), context=10, starts_per_episode=400)
    assert ends["done_acc_1"] == pytest.approx(0.7, abs=0.06)  # it never really ends
    never = open_loop_errors(Coin(), DreamConfig(end_threshold=1.0), episodes, (1,), context=10)
    assert never["done_acc_1"] == 1.0


# ---------------------------------------------------------------------------------- the chart


def test_scatter_chart_writes_a_png_of_the_requested_size(tmp_path):
    path = scatter_chart(
        tmp_path / "sub" / "fidelity.png",
        {"stop": (0.0, 1.0), "full_gas": (500.0, 420.0), "broken": (float("nan"), 1.0)},
        "dream vs real",
        xlabel="real",
        ylabel="dream",
        size=(320, 240),
    )
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (320, 240)
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert COLOURS[0] in colours and COLOURS[1] in colours  # both finite points are drawn
    assert COLOURS[2] not in colours  # the nan point is skipped


# ---------------------------------------------------------------------------------- explore


def explore_actions(space, seed, steps=300):
    p = make_policy("explore", space)
    p.reset(seed)
    return p, np.stack([p(np.zeros(1, np.float32)) for _ in range(steps)])


def test_explore_policy_bounds_determinism_and_waits():
    assert isinstance(make_policy("explore", CAR_RACING_ACTIONS), ExplorePolicy)
    waits, gas_brake = [], []
    for seed in range(20):
        p, acts = explore_actions(CAR_RACING_ACTIONS, seed)
        assert acts.dtype == np.float32 and acts.shape == (300, 3)
        assert np.all(acts >= CAR_RACING_ACTIONS.low) and np.all(acts <= CAR_RACING_ACTIONS.high)
        np.testing.assert_array_equal(acts, explore_actions(CAR_RACING_ACTIONS, seed)[1])
        assert np.all(acts[: p.wait] == 0)  # the car stands still through the wait
        assert np.any(acts[p.wait :] != 0)  # and then drives
        waits.append(p.wait)
        gas_brake.append(acts[:, 1:].mean(axis=0))
    assert any(w == 0 for w in waits) and any(w > 0 for w in waits)
    assert max(waits) <= 80
    gas, brake = np.mean(gas_brake, axis=0)
    assert gas > 2 * brake > 0  # it mostly drives, and brakes too
    assert not np.array_equal(explore_actions(CAR_RACING_ACTIONS, 0)[1],
                              explore_actions(CAR_RACING_ACTIONS, 1)[1])  # fmt: skip


def test_steady_explore_episodes_hold_one_action_to_the_end():
    def actions(seed, **params):
        p = make_policy("explore", CAR_RACING_ACTIONS, **params)
        p.reset(seed)
        return p, np.stack([p(np.zeros(1, np.float32)) for _ in range(500)])

    steady = 0
    for seed in range(40):
        p, acts = actions(seed, steady_episodes=0.5)
        if p.steady:
            steady += 1
            ramp = p.wait + 60  # the smoothing reaches the target well within 60 steps
            np.testing.assert_allclose(acts[ramp:], acts[ramp:ramp + 1].repeat(500 - ramp, 0),
                                       atol=1e-6)  # fmt: skip
        else:
            assert np.ptp(acts[p.wait :], axis=0).max() > 0.05  # segments change
    assert 10 <= steady <= 30
    # Without it the stream of actions is exactly the default policy's.
    np.testing.assert_array_equal(actions(3, steady_episodes=0.0)[1], actions(3)[1])
    assert not actions(3)[0].steady
    assert all(actions(s, steady_episodes=1.0)[0].steady for s in range(5))
    with pytest.raises(UserError, match="steady_episodes"):
        make_policy("explore", CAR_RACING_ACTIONS, steady_episodes=1.5)


def test_explore_policy_on_another_box_space():
    space = spaces.Box(np.float32([-2, 5]), np.float32([-1, 10]), dtype=np.float32)
    for seed in range(5):
        p, acts = explore_actions(space, seed, steps=100)
        assert p.wait == 0 and acts.shape == (100, 2)
        assert np.all(acts >= space.low) and np.all(acts <= space.high)
        assert np.ptp(acts[:, 1]) > 0.5  # it does explore


# ---------------------------------------------------------------------------------- the CLI


def test_cli_rejects_unknown_policy_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert wm(["fidelity", "policies=[stop,nope]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wm fidelity: error: policies: unknown policy 'nope'"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing was started
    assert wm(["fidelity", "strip=[gas_0.5,bogus]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wm fidelity: error: strip: unknown policy 'bogus'"), err


# ---------------------------------------------------------------------------------- pictures


def _paint(states) -> np.ndarray:
    """8x8 tiles whose every pixel is the car's position (floored, clipped to 0..255)."""
    x = np.clip(np.asarray(states, dtype=np.float64)[:, 0], 0, 255).astype(np.uint8)
    return np.repeat(x[:, None, None, None], 8, axis=1).repeat(8, axis=2).repeat(3, axis=3)


def _tile(picture, row, col):
    """The inside of one tile (tiles are 8 px plus a 1 px gap on each side; borders are 2 px)."""
    return picture[row * 10 + 3 : row * 10 + 7, col * 10 + 3 : col * 10 + 7]


@pytest.mark.parametrize("name, seed", [("gas_0.5", 10), ("full_gas", 11), ("stop", 12)])
def test_strip_of_a_perfect_model_shows_the_real_frames_and_ends(name, seed):
    every, dreams = 25, 2
    picture = policy_strip(
        Walled(),
        DREAM,
        encode,
        lambda z: _paint(z.numpy()),
        _paint,
        WalledCar(),
        fixed_policy(name),
        seed,
        WARMUP,
        WARMUP_ACTION,
        horizon=300,
        every=every,
        dreams=dreams,
    )
    cols = 300 // every + 1
    assert picture.shape == ((1 + dreams) * 10, cols * 10, 3)
    _, ended, frames = play_from_warmup(
        WalledCar(),
        make_policy("constant", CAR_RACING_ACTIONS, action=list(FIXED_POLICIES[name][1])),
        seed,
        WARMUP,
        np.asarray(WARMUP_ACTION, np.float32),
        300,
        keep_all=True,
    )
    seen = len(frames) - WARMUP  # frames from the policy's first one, the end's included
    grey = np.full((4, 4, 3), 128)
    for col in range(cols):
        real = _tile(picture, 0, col)
        if col * every < seen:
            assert np.array_equal(
                real, _paint(frames[WARMUP + col * every : WARMUP + col * every + 1])[0, :4, :4]
            )
        else:
            assert np.array_equal(real, grey)
        for row in range(1, 1 + dreams):  # the perfect dream: the same pictures, the same end
            assert np.abs(_tile(picture, row, col).astype(int) - real).max() <= 1
    assert ended == (seen < 301)


def test_strip_shows_an_action_blind_dream_drifting_from_reality():
    picture = policy_strip(
        ActionBlind(),
        DREAM,
        encode,
        lambda z: _paint(z.numpy()),
        _paint,
        ToyCar(),
        fixed_policy("stop"),
        SEEDS[0],
        WARMUP,
        WARMUP_ACTION,
        horizon=100,
        every=50,
        dreams=1,
    )
    assert np.array_equal(_tile(picture, 0, 0), _tile(picture, 1, 0))  # the same start
    assert _tile(picture, 1, 2).min() > _tile(picture, 0, 2).max() + 20  # it drove on
