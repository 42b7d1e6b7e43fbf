"""Policies for collecting rollouts: any callable `obs -> action` with an optional `reset(seed)`.

A trained controller plugs in the same way. Built-in ones, by name (`make_policy`):

- `uniform`: independent uniform actions each step (the naive baseline).
- `correlated`: actions that persist and drift: a target action is held for a random number of
  steps (geometric, mean `hold_mean`) while the applied action moves towards it (`smoothing`).
  On CarRacing's [steer, gas, brake] space the targets are drawn so that the car mostly drives
  (gas more often than brake, straight stretches and turns), which is what lets random data
  cover the track as in the original World Models collection.
- `explore`: on CarRacing, episodes made of segments that each hold one way of driving — steady
  gas at a random level, coasting, braking, standing still — after an optional wait at the start,
  so the data shows what each action does from every kind of state (the car at rest included),
  not only what a drifting random driver does. Elsewhere it behaves like `correlated`.
- `constant`: the same action every step (`action: [steer, gas, brake]`), e.g. full gas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from gymnasium import spaces

from gen_core.errors import UserError


class Policy(Protocol):
    name: str

    def reset(self, seed: int | None = None) -> None: ...

    def __call__(self, obs: np.ndarray) -> np.ndarray: ...


def _is_car_racing_space(space: spaces.Box) -> bool:
    return (
        space.shape == (3,)
        and np.allclose(space.low, [-1, 0, 0])
        and np.allclose(space.high, [1, 1, 1])
    )


class UniformRandomPolicy:
    """Independent uniform random actions within the action space's bounds."""

    name = "uniform"

    def __init__(self, action_space: spaces.Box):
        self.space = action_space
        self.rng = np.random.default_rng()

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.space.low, self.space.high).astype(np.float32)


class CorrelatedRandomPolicy:
    """Random actions that persist for several steps and drift smoothly between targets.

    Args:
        hold_mean: mean number of steps a target action is held (geometric distribution).
        smoothing: fraction of the way the applied action moves to the target each step
            (1.0 jumps at once; smaller drifts).
        warmup_gas_steps: on CarRacing, steps of straight full gas at the start, so every
            episode leaves the start line (the first ~50 frames are the zoom-in animation).
    """

    name = "correlated"

    def __init__(
        self,
        action_space: spaces.Box,
        hold_mean: float = 10.0,
        smoothing: float = 0.5,
        warmup_gas_steps: int = 40,
    ):
        if hold_mean < 1:
            raise UserError(f"policy_params.hold_mean: expected a value >= 1, got {hold_mean}")
        if not 0 < smoothing <= 1:
            raise UserError(f"policy_params.smoothing: expected 0 < value <= 1, got {smoothing}")
        self.space = action_space
        self.hold_mean = hold_mean
        self.smoothing = smoothing
        self.warmup = warmup_gas_steps
        self.car_racing = _is_car_racing_space(action_space)
        self.reset(None)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.t = 0
        self.hold = 0
        self.target = self._draw_target()
        self.action = np.zeros(self.space.shape, dtype=np.float64)
        if self.car_racing:
            self.action[:] = 0.0

    def _draw_target(self) -> np.ndarray:
        rng = self.rng
        if not self.car_racing:
            return rng.uniform(self.space.low, self.space.high)
        # Steering: a third straight, the rest turns of random sharpness.
        steer = 0.0 if rng.random() < 0.35 else rng.uniform(-1.0, 1.0)
        mode = rng.random()
        if mode < 0.70:  # drive on
            gas, brake = rng.uniform(0.2, 1.0), 0.0
        elif mode < 0.85:  # coast
            gas, brake = 0.0, 0.0
        else:  # brake
            gas, brake = 0.0, rng.uniform(0.1, 0.8)
        return np.array([steer, gas, brake])

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        self.t += 1
        if self.car_racing and self.t <= self.warmup:
            return np.array([0.0, 1.0, 0.0], dtype=np.float32)
        if self.hold <= 0:
            self.target = self._draw_target()
            self.hold = self._draw_hold()
        self.hold -= 1
        self.action += self.smoothing * (self.target - self.action)
        return np.clip(self.action, self.space.low, self.space.high).astype(np.float32)

    def _draw_hold(self) -> int:
        return int(self.rng.geometric(1.0 / self.hold_mean))


class ExplorePolicy(CorrelatedRandomPolicy):
    """Segments of steady driving styles, so every action's effect is seen from varied states.

    Args:
        segment_mean: mean steps of a segment (geometric).
        wait_prob: chance an episode starts by standing still for up to `max_wait` steps.
        modes: relative frequency of drive (steady gas in [0.1, 1]), coast, brake, idle (zero).
        steady_episodes: chance an episode holds one segment's action to its end (after its
            wait), so the data shows where a steady action leads in the long run: off the road,
            a spin on the grass, out of the playfield, round in circles.
    """

    name = "explore"

    def __init__(
        self,
        action_space: spaces.Box,
        segment_mean: float = 25.0,
        smoothing: float = 0.3,
        wait_prob: float = 0.5,
        max_wait: int = 80,
        modes: tuple[float, float, float, float] = (0.65, 0.15, 0.1, 0.1),
        steady_episodes: float = 0.0,
    ):
        if len(modes) != 4 or min(modes) < 0 or sum(modes) <= 0:
            raise UserError("policy_params.modes: expected 4 non-negative weights")
        if not 0 <= steady_episodes <= 1:
            raise UserError(
                f"policy_params.steady_episodes: expected a chance in [0, 1], got {steady_episodes}"
            )
        self.steady_episodes = steady_episodes
        self.wait_prob, self.max_wait = wait_prob, max_wait
        self.modes = np.asarray(modes, dtype=np.float64) / sum(modes)
        super().__init__(action_space, segment_mean, smoothing, warmup_gas_steps=0)

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.wait = 0
        if self.car_racing and self.rng.random() < self.wait_prob:
            self.wait = int(self.rng.integers(1, self.max_wait + 1))
        # Drawn only when asked for, so episodes collected without it stay as they were.
        self.steady = self.steady_episodes > 0 and self.rng.random() < self.steady_episodes

    def _draw_hold(self) -> int:
        return 2**62 if self.steady else super()._draw_hold()

    def _draw_target(self) -> np.ndarray:
        rng = self.rng
        if not self.car_racing:
            return rng.uniform(self.space.low, self.space.high)
        steer = 0.0 if rng.random() < 0.4 else rng.uniform(-1.0, 1.0) * rng.random()
        mode = rng.choice(4, p=self.modes)
        if mode == 0:  # drive at a steady gas level
            return np.array([steer, rng.uniform(0.1, 1.0), 0.0])
        if mode == 1:  # coast
            return np.array([steer, 0.0, 0.0])
        if mode == 2:  # brake
            return np.array([steer, 0.0, rng.uniform(0.3, 1.0)])
        return np.zeros(3)  # stand still (once the car has stopped)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.t < self.wait:
            self.t += 1
            return np.zeros(self.space.shape, dtype=np.float32)
        return super().__call__(obs)


class ConstantPolicy:
    """The same action every step."""

    name = "constant"

    def __init__(self, action_space: spaces.Box, action: list[float] | None = None):
        if action is None:
            raise UserError("policy_params.action: the constant policy needs an action list")
        try:
            a = np.asarray(action, dtype=np.float32)
        except (TypeError, ValueError):
            a = None
        if a is None or a.shape != action_space.shape:
            raise UserError(
                f"policy_params.action: expected a list of {action_space.shape[0]} numbers, "
                f"got {action!r}"
            )
        if np.any(a < action_space.low) or np.any(a > action_space.high):
            raise UserError(
                f"policy_params.action: {list(a)} lies outside the action bounds "
                f"{list(action_space.low)}..{list(action_space.high)}"
            )
        self.a = a

    def reset(self, seed: int | None = None) -> None:
        pass

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.a.copy()


POLICIES: dict[str, Callable[..., Policy]] = {
    "uniform": UniformRandomPolicy,
    "correlated": CorrelatedRandomPolicy,
    "constant": ConstantPolicy,
    "explore": ExplorePolicy,
}


def make_policy(name: str, action_space: spaces.Space, **params: Any) -> Policy:
    """Build a built-in policy by name; bad names or parameters raise a one-line UserError."""
    if not isinstance(action_space, spaces.Box):
        raise UserError(f"policy {name}: only continuous (Box) action spaces are supported")
    if name not in POLICIES:
        raise UserError(f"policy: unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
    try:
        return POLICIES[name](action_space, **params)
    except (TypeError, ValueError) as err:  # a missing or unknown argument, or a mistyped one
        raise UserError(f"policy_params: {err} (policy {name})") from None
