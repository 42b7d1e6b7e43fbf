"""CarRacingFast-v3 must be indistinguishable from stock CarRacing-v3: same observations (bit for
bit), rewards, terminations and truncations for the same seeds and actions."""

import math
import os
import warnings

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pytest  # noqa: E402
from gymnasium.envs.box2d.car_racing import PLAYFIELD  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402

import rollouts.envs  # noqa: E402, F401  (registers CarRacingFast-v3)
from rollouts.envs.car_racing_fast import CarRacingFast  # noqa: E402

STOCK_ID = "CarRacing-v3"
FAST_ID = "CarRacingFast-v3"


def _actions(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform([-1.0, 0.0, 0.0], [1.0, 1.0, 1.0], size=(n, 3)).astype(np.float32)


def _assert_same_step(stock_out, fast_out, where: str) -> None:
    obs_s, rew_s, term_s, trunc_s, info_s = stock_out
    obs_f, rew_f, term_f, trunc_f, info_f = fast_out
    assert obs_f.shape == obs_s.shape and obs_f.dtype == obs_s.dtype, where
    if not np.array_equal(obs_s, obs_f):
        n_px = int((obs_s != obs_f).any(axis=-1).sum())
        pytest.fail(f"{where}: {n_px} pixels differ")
    assert (rew_f, term_f, trunc_f) == (rew_s, term_s, trunc_s), where
    assert info_f == info_s, where


def _shift_car(env, dx: float, dy: float) -> None:
    car = env.unwrapped.car
    for body in [car.hull, *car.wheels]:
        x, y = body.position
        body.position = (x + dx, y + dy)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_to_stock_with_mid_run_reset(seed):
    stock, fast = gym.make(STOCK_ID), gym.make(FAST_ID)
    try:
        obs_s, _ = stock.reset(seed=seed)
        obs_f, _ = fast.reset(seed=seed)
        assert np.array_equal(obs_s, obs_f)
        for i, action in enumerate(_actions(seed, 320)):
            if i == 160:
                # A new track mid-run; arrays built for the old one must not leak through.
                obs_s, _ = stock.reset(seed=seed + 1000)
                obs_f, _ = fast.reset(seed=seed + 1000)
                assert np.array_equal(obs_s, obs_f), f"seed {seed}: reset obs differ"
            out_s, out_f = stock.step(action), fast.step(action)
            _assert_same_step(out_s, out_f, f"seed {seed} step {i}")
            if out_s[2] or out_s[3]:
                stock.reset(seed=seed + i)
                fast.reset(seed=seed + i)
    finally:
        stock.close()
        fast.close()


def test_identical_with_domain_randomize_and_rgb_array():
    kwargs = {"domain_randomize": True, "render_mode": "rgb_array"}
    stock, fast = gym.make(STOCK_ID, **kwargs), gym.make(FAST_ID, **kwargs)
    try:
        for episode, options in enumerate([None, {"randomize": False}, None]):
            seed = 7 + episode
            obs_s, _ = stock.reset(seed=seed, options=options)
            obs_f, _ = fast.reset(seed=seed, options=options)
            assert np.array_equal(obs_s, obs_f)
            for i, action in enumerate(_actions(seed, 70)):
                _assert_same_step(stock.step(action), fast.step(action), f"ep {episode} {i}")
                if i % 20 == 0:
                    frame_s, frame_f = stock.render(), fast.render()
                    assert frame_s.shape == (400, 600, 3)
                    assert np.array_equal(frame_s, frame_f), f"ep {episode} step {i}: rgb_array"
    finally:
        stock.close()
        fast.close()


def test_identical_at_quarter_turns():
    # pygame-ce rotates by exact coordinate swaps within 1e-6 rad of a multiple of pi/2.
    stock, fast = gym.make(STOCK_ID), gym.make(FAST_ID)
    try:
        stock.reset(seed=3)
        fast.reset(seed=3)
        for action in _actions(3, 60):  # past the initial zoom animation
            stock.step(action)
            fast.step(action)
        for k in range(-4, 5):
            for delta in (0.0, 5e-7, -5e-7, 2e-6):
                for env in (stock, fast):
                    env.unwrapped.car.hull.angle = k * math.pi / 2 + delta
                a = stock.unwrapped._render("state_pixels")
                b = fast.unwrapped._render("state_pixels")
                assert np.array_equal(a, b), f"angle {k} * pi/2 + {delta}"
    finally:
        stock.close()
        fast.close()


def test_identical_at_field_edge_and_off_field():
    # Near the boundary the field no longer covers the screen (the path that draws it like stock)
    # and leaving it ends the episode with -100.
    stock, fast = gym.make(STOCK_ID), gym.make(FAST_ID)
    try:
        stock.reset(seed=4)
        fast.reset(seed=4)
        x, y = stock.unwrapped.car.hull.position
        for env in (stock, fast):
            _shift_car(env, PLAYFIELD - 8.0 - x, -y)
        gas = np.array([0.0, 1.0, 0.0], dtype=np.float32)
        for i in range(40):
            _assert_same_step(stock.step(gas), fast.step(gas), f"edge step {i}")
        for env in (stock, fast):
            _shift_car(env, 2 * PLAYFIELD, 0.0)  # far outside: the screen is mostly black
        out_s, out_f = stock.step(gas), fast.step(gas)
        _assert_same_step(out_s, out_f, "off field")
        assert out_s[1] == -100 and out_s[2]
    finally:
        stock.close()
        fast.close()


def test_identical_when_indicators_overflow_the_bar():
    # A wheel spinning fast enough draws its indicator above the bar, into the scene's rows,
    # where the flip-free path cannot be used; both directions, and back to normal.
    stock, fast = gym.make(STOCK_ID), gym.make(FAST_ID)
    try:
        stock.reset(seed=5)
        fast.reset(seed=5)
        for action in _actions(5, 30):
            stock.step(action)
            fast.step(action)
        for omega in (1000.0, -1000.0, 390.0, 410.0, None):
            for env in (stock, fast):
                wheel = env.unwrapped.car.wheels[0]
                wheel.omega = wheel.omega if omega is None else omega
            for mode in ("state_pixels", "rgb_array"):
                a = stock.unwrapped._render(mode)
                b = fast.unwrapped._render(mode)
                assert np.array_equal(a, b), f"omega {omega} {mode}"
    finally:
        stock.close()
        fast.close()


def test_two_stage_smoothscale_matches_one_call():
    # The flip-free path relies on this property of pygame-ce's smoothscale.
    rng = np.random.default_rng(0)
    src = pygame.Surface((1000, 800))
    pygame.surfarray.pixels3d(src)[:] = rng.integers(0, 256, (1000, 800, 3), dtype=np.uint8)
    for width, height in [(96, 96), (600, 400)]:
        one = pygame.transform.smoothscale(src, (width, height))
        two = pygame.transform.smoothscale(
            pygame.transform.smoothscale(src, (width, 800)), (width, height)
        )
        assert np.array_equal(pygame.surfarray.array3d(one), pygame.surfarray.array3d(two))


def test_human_mode_and_font_module_restart():
    # Human mode takes the stock route for the window; closing it runs pygame.quit(), which
    # invalidates every open font, including the fast env's cached one.
    stock = gym.make(STOCK_ID)
    fast = gym.make(FAST_ID)
    human = gym.make(FAST_ID, render_mode="human")
    try:
        stock.reset(seed=6)
        fast.reset(seed=6)
        human.reset(seed=6)
        for i, action in enumerate(_actions(6, 40)):
            out_s, out_f, out_h = stock.step(action), fast.step(action), human.step(action)
            _assert_same_step(out_s, out_f, f"step {i}")
            _assert_same_step(out_s, out_h, f"human step {i}")
            if i == 10:
                human.close()
                human = gym.make(FAST_ID)
                human.reset(seed=6)
                for replay in _actions(6, i + 1):
                    human.step(replay)
    finally:
        stock.close()
        fast.close()
        human.close()


def test_check_env_passes():
    # The unwrapped env: check_env warns when handed gym.make's wrappers.
    env = gym.make(FAST_ID, render_mode="rgb_array")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env.unwrapped)
    finally:
        env.close()


def test_registration():
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(rollouts.envs)  # a second import must not re-register (gym warns)
    spec = gym.spec(FAST_ID)
    assert spec.max_episode_steps == 1000
    assert spec.reward_threshold == 900
    env = gym.make(FAST_ID)
    try:
        assert isinstance(env.unwrapped, CarRacingFast)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (96, 96, 3) and obs.dtype == np.uint8
        assert env.observation_space.contains(obs)
    finally:
        env.close()
