"""The dream: M used as an environment, through the one-step protocol of `gen_core/mdn.py`.

Every dream in the toolkit runs here, whatever M is (the MDN-RNN or the Transformer M):
`DreamConfig` declares the dream's settings once (temperature, the real warm-up before a dream
starts, the end threshold); `DreamStarts` builds start states from real encoded steps;
`dream_rollouts` advances a batch of rollouts under a policy (CMA-ES's whole population at once,
and `wm fidelity`'s policies); `DreamVectorEnv` is the same dream as a gymnasium `VectorEnv` for
other RL libraries (`worldmodels/Dream-v0`; `gymnasium.make_vec("worldmodels/Dream-v0",
num_envs=..., vectorization_mode="vector_entry_point", model=..., starts=...)`).

A dream starts from real encoded frames (Ha & Schmidhuber's dreams do too;
../shared/notes/dream-transfer.md): M reads the `warmup` real steps before the start from an
empty memory, then runs on its own draws. Temperature tau follows World Models: mixture logits
divided by tau, component stds multiplied by sqrt(tau); a slightly hot dream (1.15) is harder
than reality and transfers better.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from gen_core.config import setting
from gen_core.mdn import BatchState, StepModel, WorldStep

DREAM_ENV_ID = "worldmodels/Dream-v0"

Policy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, features) -> actions


@dataclass
class DreamConfig:
    """How M dreams: shared by train-controller, fidelity, dream-video and the gymnasium env."""

    temperature: float = setting(
        1.15, "sampling temperature tau (World Models: a slightly hot dream transfers)", min=0.0
    )
    warmup: int = setting(
        10, "real steps M reads, from an empty memory, before the dream takes over", min=0
    )
    end_threshold: float = setting(
        0.5, "M's end probability above which a dreamed episode ends", min=0.0, max=1.0
    )
    end_reward: float = setting(
        0.0,
        "reward of an episode end, charged at every dreamed step in expectation (x M's end "
        "probability): CarRacing's exit from the playfield costs -100, which the reward head "
        "leaves out (m.reward_clip)",
    )
    survival: bool = setting(
        False,
        "weigh each dreamed step's reward by the chance, under M's end head, that the episode is "
        "still running (the product of 1 - end probability so far): the expected return",
    )


@dataclass
class DreamStarts:
    """A bank of dream start states: the real z each starts from and M's state after reading
    the real steps before it."""

    z: torch.Tensor  # (N, z_dim)
    state: BatchState  # N rows

    def __len__(self) -> int:
        return len(self.z)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, BatchState]:
        return self.z[idx], self.state.take(idx)

    def to(self, device) -> DreamStarts:
        return DreamStarts(self.z.to(device), self.state.to(device))

    @classmethod
    @torch.no_grad()
    def from_steps(cls, model: StepModel, z: torch.Tensor, actions: torch.Tensor) -> DreamStarts:
        """Starts after real steps: z (N, W + 1, z_dim), actions (N, W, A). M reads the first W
        (z, a) from an empty memory; each start is the last z and M's state then."""
        state = model.initial_state(len(z))
        for t in range(actions.shape[1]):
            state = model.observe(state, z[:, t], actions[:, t])
        return cls(z[:, -1].clone(), state)

    @classmethod
    def from_episodes(
        cls,
        model: StepModel,
        episodes: Sequence[dict[str, np.ndarray]],
        n: int,
        warmup: int,
        max_start: int | None = 0,
        seed: int = 0,
    ) -> DreamStarts:
        """`n` starts at points of real encoded episodes (dicts with `mu`, `actions`), each
        after the `warmup` real steps before it.

        max_start: latest step a start may be at beyond the warm-up (0: right after it, like
        the real env's episode start; None: anywhere along the episode).
        """
        rng = np.random.default_rng(seed)
        usable = [ep for ep in episodes if len(ep["actions"]) > warmup]
        if not usable:
            raise ValueError(f"no episode is longer than the warm-up of {warmup} steps")
        picks = []  # (episode, start step)
        for _ in range(n):
            e = int(rng.integers(len(usable)))
            T = len(usable[e]["actions"])
            hi = T - 1 if max_start is None else min(T - 1, warmup + max_start)
            picks.append((e, int(rng.integers(warmup, hi + 1))))
        z = torch.stack(
            [torch.as_tensor(usable[e]["mu"][t - warmup : t + 1]) for e, t in picks]
        ).float()  # (n, warmup + 1, z_dim)
        a = torch.stack(
            [torch.as_tensor(usable[e]["actions"][t - warmup : t]) for e, t in picks]
        ).float()  # (n, warmup, A)
        return cls.from_steps(model, z, a)


def step_reward(s: WorldStep, dream: DreamConfig) -> torch.Tensor:
    """A dreamed step's reward (B,): M's reward plus the end's reward in expectation.

    M rarely sees an episode end (CarRacing's explore data: ~10 exits in 47,000 steps), so its
    end probability seldom passes the threshold, and a dream that stopped only there would not
    charge the exit. In expectation every step that heads for the exit pays its share."""
    if not dream.end_reward:
        return s.reward
    return s.reward + dream.end_reward * s.end_prob


@torch.no_grad()
def dream_rollouts(
    model: StepModel,
    policy: Policy,
    z: torch.Tensor,
    state: BatchState,
    steps: int,
    dream: DreamConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total predicted reward (B,) of a batch of dream rollouts from (z (B, z_dim), state), all
    advanced together, and whether each ended (B,) bool: M's end probability passed
    `dream.end_threshold` within `steps` (the last step included). A rollout stops collecting
    reward at its end. `policy(z, features) -> actions (B, A)`. Each step's reward is M's
    predicted reward plus `dream.end_reward` x M's end probability (see `step_reward`)."""
    total = torch.zeros(len(z), device=z.device)  # (B,)
    # (B,) 1.0 while collecting reward; with dream.survival, the chance the episode still runs
    alive = torch.ones(len(z), device=z.device)
    for _ in range(steps):
        s = model.step(state, z, policy(z, model.features(state)), dream.temperature, generator)
        total.addcmul_(step_reward(s, dream), alive)
        if dream.survival:
            alive.mul_(1.0 - s.end_prob)
        alive.masked_fill_(s.end_prob > dream.end_threshold, 0.0)
        z, state = s.z, s.state
        if not alive.any():
            break
    return total, alive == 0


def dream_returns(
    model: StepModel,
    policy: Policy,
    starts: DreamStarts,
    start_idx: torch.Tensor,
    steps: int,
    dream: DreamConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Total dream reward (B,) of rollouts from the starts `start_idx` (B,)."""
    z, state = starts.take(start_idx)
    return dream_rollouts(model, policy, z, state, steps, dream, generator)[0]


class DreamVectorEnv(VectorEnv):
    """M's dream as a gymnasium vector env; observations are [z, features] (C's input), or z
    alone with `observe_hidden=False`.

    What RL libraries look for is built in: `reset(seed=...)` fixes every draw (start states and
    M's samples), sub-envs reset on the step after their end (gymnasium's next-step autoreset),
    and the step that ends an episode reports its statistics in `info["episode"]` (`r` return,
    `l` length, `t` seconds; `info["_episode"]` marks the sub-envs that ended), as gymnasium's
    RecordEpisodeStatistics and SB3's Monitor do.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        model: StepModel,
        starts: DreamStarts,
        num_envs: int = 1,
        dream: DreamConfig | None = None,
        max_steps: int = 1000,
        action_low: Sequence[float] | None = None,
        action_high: Sequence[float] | None = None,
        observe_hidden: bool = True,
        decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ):
        self.model = model
        self.device = torch.device(device)
        self.starts = starts.to(self.device)
        self.num_envs = num_envs
        self.dream = dream or DreamConfig()
        self.max_steps = max_steps
        self.observe_hidden = observe_hidden
        self.decoder = decoder
        self.render_mode = render_mode
        obs_dim = model.z_dim + (model.feature_dim if observe_hidden else 0)
        low = np.asarray(action_low if action_low is not None else [-1.0] * model.action_dim)
        high = np.asarray(action_high if action_high is not None else [1.0] * model.action_dim)
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.single_action_space = spaces.Box(
            low.astype(np.float32), high.astype(np.float32), dtype=np.float32
        )
        self.observation_space = gym.vector.utils.batch_space(
            self.single_observation_space, num_envs
        )
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(0)
        self.z, self.state = self.starts.take(torch.zeros(num_envs, dtype=torch.long))
        self.t = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._return = np.zeros(num_envs)  # this episode's dream reward so far
        self._survival = np.ones(num_envs)  # dream.survival: the chance it still runs
        self._began = np.full(num_envs, time.perf_counter())  # when this episode started

    def _obs(self) -> np.ndarray:
        parts = [self.z, self.model.features(self.state)] if self.observe_hidden else [self.z]
        return torch.cat(parts, dim=-1).cpu().numpy().astype(np.float32)

    def _restart(self, mask: np.ndarray) -> None:
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return
        picks = self.np_random.integers(0, len(self.starts), size=len(idx))
        z, state = self.starts.take(torch.as_tensor(picks, device=self.device))
        where = torch.as_tensor(idx, device=self.device)
        self.z[where] = z
        self.state.put(where, state)
        self.t[idx] = 0
        self._needs_reset[idx] = False
        self._return[idx] = 0.0
        self._survival[idx] = 1.0
        self._began[idx] = time.perf_counter()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._generator.manual_seed(int(self.np_random.integers(2**62)))
        self._restart(np.ones(self.num_envs, dtype=bool))
        return self._obs(), {}

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = np.asarray(actions, dtype=np.float32).reshape(self.action_space.shape)
        a = torch.as_tensor(actions, device=self.device)
        resetting = self._needs_reset.copy()
        with torch.no_grad():
            s = self.model.step(self.state, self.z, a, self.dream.temperature, self._generator)
        self.z, self.state = s.z, s.state
        self.t += 1
        reward = step_reward(s, self.dream).cpu().numpy().astype(np.float64)
        if self.dream.survival:
            reward *= self._survival
            self._survival *= 1.0 - s.end_prob.cpu().numpy()
        terminated = (s.end_prob > self.dream.end_threshold).cpu().numpy()
        truncated = (self.t >= self.max_steps) & ~terminated
        # Next-step autoreset: sub-envs that ended last step start afresh now, actions ignored.
        self._restart(resetting)
        reward[resetting] = 0.0
        terminated[resetting] = False
        truncated[resetting] = False
        self._needs_reset = terminated | truncated
        self._return += reward
        info = {}
        if self._needs_reset.any():
            ended = self._needs_reset
            info["episode"] = {
                "r": np.where(ended, self._return, 0.0),
                "l": np.where(ended, self.t, 0),
                "t": np.where(ended, np.round(time.perf_counter() - self._began, 6), 0.0),
            }
            info["_episode"] = ended.copy()
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """Frames decoded from the current z with V: (num_envs, H, W, 3) uint8."""
        if self.decoder is None:
            return None
        with torch.no_grad():
            x = self.decoder(self.z)  # (B, 3, H, W) in [0, 1]
        return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    def close_extras(self, **kwargs: Any) -> None:
        pass


class DreamEnv(gym.Env):
    """One dream as a plain `gymnasium.Env`: what single-env RL code takes (SB3 through
    `make_vec_env`, `check_env`); after an end, call `reset()` as gymnasium asks."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        self._vec = DreamVectorEnv(num_envs=1, render_mode=render_mode, **kwargs)
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space
        self.render_mode = render_mode

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        obs, info = self._vec.reset(seed=int(self.np_random.integers(2**31)))
        return obs[0], info

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self._vec.step(np.asarray(action)[None])
        if "episode" in info:  # one env: the statistics as scalars
            info = {"episode": {k: v[0].item() for k, v in info["episode"].items()}}
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> np.ndarray | None:
        frames = self._vec.render()
        return None if frames is None else frames[0]


def _make_dream(num_envs: int = 1, **kwargs: Any) -> DreamVectorEnv:
    return DreamVectorEnv(num_envs=num_envs, **kwargs)


if DREAM_ENV_ID not in gym.registry:
    gym.register(id=DREAM_ENV_ID, entry_point=DreamEnv, vector_entry_point=_make_dream)
