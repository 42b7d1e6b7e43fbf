"""The dream: M (an MDN-RNN with reward and done heads) used as an environment.

`DreamVectorEnv` is a real gymnasium `VectorEnv`: its state per sub-env is (z, h, c); `step`
runs M one step for the whole batch, samples the next z at the set temperature and returns the
predicted reward and episode end. Observations are what the controller sees, [z, h]; `render`
decodes z to frames with V when a decoder is given. It is registered as `worldmodels/Dream-v0`
(use `gymnasium.make_vec("worldmodels/Dream-v0", num_envs=..., vectorization_mode=
"vector_entry_point", model=..., start_states=...)`), so other RL libraries can train in it.

`dream_returns` is the fast path CMA-ES uses: every candidate x trial rollout of a population
advanced together as one batch of tensors, no numpy round trips.

Start states come from real encoded frames: `StartStates.from_episodes` picks points of real
episodes and runs M over the real steps before each (a warm-up, or the whole episode so far), so
h starts from real context
(Ha & Schmidhuber's dream starts from real frames too; see ../shared/notes/dream-transfer.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from gen_core.mdnrnn import MDNRNN, sample_mixture

DREAM_ENV_ID = "worldmodels/Dream-v0"


@dataclass
class StartStates:
    """A bank of dream start states: z (N, z_dim), h and c (N, hidden)."""

    z: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor

    def __len__(self) -> int:
        return len(self.z)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.z[idx], self.h[idx], self.c[idx]

    def to(self, device) -> StartStates:
        return StartStates(self.z.to(device), self.h.to(device), self.c.to(device))

    @classmethod
    @torch.no_grad()
    def from_episodes(
        cls,
        model: MDNRNN,
        episodes: Sequence[dict[str, np.ndarray]],
        n: int,
        warmup: int = 0,
        max_start: int | None = 0,
        seed: int = 0,
        context: str = "warmup",
    ) -> StartStates:
        """Pick `n` start points of real encoded episodes (dicts with `mu`, `actions`).

        Args:
            warmup: real steps before the earliest start point; with context "warmup", the
                steps M runs over (from zero state) to fill (h, c).
            max_start: latest step a start point may be at, beyond the warm-up (0: every start
                is right after the warm-up, like the real env's episode start; None: anywhere).
            context: "warmup", M's memory comes from the `warmup` steps before the start;
                "episode", from every real step since the episode began, as an agent's memory
                in the real env (and M trained with `carry_state`) has it.
        """
        if context not in ("warmup", "episode"):
            raise ValueError(f"context: expected 'warmup' or 'episode', got {context!r}")
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
        zs = torch.stack(
            [torch.as_tensor(usable[e]["mu"][t], dtype=torch.float32) for e, t in picks]
        )
        if context == "episode":
            h, c = _states_along_episodes(model, usable, picks)
            return cls(zs, h, c)
        hs, cs = [], []
        for e, t in picks:
            ep = usable[e]
            state = model.initial_state(1)
            if warmup:
                mu = torch.as_tensor(ep["mu"][t - warmup : t], dtype=torch.float32)
                a = torch.as_tensor(ep["actions"][t - warmup : t], dtype=torch.float32)
                state = model(mu[None], a[None]).state
            hs.append(state[0][0, 0])
            cs.append(state[1][0, 0])
        return cls(zs, torch.stack(hs), torch.stack(cs))


@torch.no_grad()
def _states_along_episodes(
    model: MDNRNN, episodes: Sequence[dict[str, np.ndarray]], picks: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """M's (h, c) after the real steps 0..t-1 of each picked (episode, t): (N, hidden) each.

    The picked episodes run side by side through M's fused step, each state kept when its
    step comes up.
    """
    used = sorted({e for e, _ in picks})
    row = {e: i for i, e in enumerate(used)}
    length = max(t for _, t in picks)
    m = model.stepper()
    hidden = model.config.hidden
    mu = torch.zeros(len(used), length + 1, model.config.z_dim)
    act = torch.zeros(len(used), length + 1, model.config.action_dim)
    for e in used:
        t = min(length, len(episodes[e]["actions"]))
        mu[row[e], :t] = torch.as_tensor(episodes[e]["mu"][:t], dtype=torch.float32)
        act[row[e], :t] = torch.as_tensor(episodes[e]["actions"][:t], dtype=torch.float32)
    wanted: dict[int, list[int]] = {}  # step -> the picks that start there
    for i, (_, t) in enumerate(picks):
        wanted.setdefault(t, []).append(i)
    h_out = torch.zeros(len(picks), hidden)
    c_out = torch.zeros(len(picks), hidden)
    h = torch.zeros(len(used), hidden)
    c = torch.zeros(len(used), hidden)
    for t in range(length + 1):
        for i in wanted.get(t, []):
            h_out[i], c_out[i] = h[row[picks[i][0]]], c[row[picks[i][0]]]
        if t < length:
            h, c = m.lstm(mu[:, t], act[:, t], h, c)
    return h_out, c_out


@dataclass
class DreamStep:
    z: torch.Tensor  # (B, z_dim) next latent
    h: torch.Tensor  # (B, hidden)
    c: torch.Tensor  # (B, hidden)
    reward: torch.Tensor  # (B,)
    done: torch.Tensor  # (B,) bool


@torch.no_grad()
def dream_step(
    model: MDNRNN,
    z: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    action: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    done_threshold: float = 0.5,
) -> DreamStep:
    """Advance a batch of dream states one step under `action` (B, action_dim)."""
    out = model.step(z, action, (h.unsqueeze(0), c.unsqueeze(0)))
    z_next = sample_mixture(
        out.logit_pi[:, 0], out.mu[:, 0], out.log_sigma[:, 0], temperature, generator
    )  # (B, z_dim)
    B = z.shape[0]
    reward = out.reward[:, 0] if out.reward is not None else torch.zeros(B, device=z.device)
    if out.done_logit is not None:
        done = torch.sigmoid(out.done_logit[:, 0]) > done_threshold
        reward = reward + model.config.done_reward * done
    else:
        done = torch.zeros(B, dtype=torch.bool, device=z.device)
    return DreamStep(z_next, out.state[0][0], out.state[1][0], reward, done)


@torch.no_grad()
def dream_returns(
    model: MDNRNN,
    policy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start: StartStates,
    start_idx: torch.Tensor,
    steps: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    done_threshold: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Total dream reward of a batch of rollouts, all advanced together.

    Args:
        policy: maps (z (B, z_dim), h (B, hidden)) to actions (B, action_dim).
        start_idx: (B,) which start state each rollout begins from.
        steps: dream length; a rollout whose predicted done fires earns M's `done_reward` on
            that step and stops collecting reward.
        dtype: M's matmuls in float32 or bfloat16 (faster on CPUs with bf16 dot products, less
            exact; see `MDNStepper`).

    Returns (B,) returns. Same rollouts as stepping `dream_step` (same generator draws), through
    `MDNStepper`'s fused step.
    """
    m = model.stepper(dtype)
    z, h, c = start.take(start_idx)
    B = len(start_idx)
    total = torch.zeros(B, device=z.device)
    alive = torch.ones(B, device=z.device)  # (B,) 1.0 while collecting reward
    for _ in range(steps):
        action = policy(z, h)  # (B, action_dim)
        h, c = m.lstm(z, action, h, c)  # (B, hidden) each
        out = m.heads(h)  # (B, n_out)
        z = m.sample(out, temperature, generator)  # (B, z_dim)
        reward = m.reward(out)
        if reward is not None:
            total.addcmul_(reward, alive)
        done_logit = m.done_logit(out)
        if done_logit is not None:
            ended = torch.sigmoid(done_logit) > done_threshold  # (B,)
            if model.config.done_reward:
                total.addcmul_(ended.to(total.dtype), alive, value=model.config.done_reward)
            alive.masked_fill_(ended, 0.0)
            if not alive.any():
                break
    return total


class DreamVectorEnv(VectorEnv):
    """M as a gymnasium vector env; observations are [z, h] (or z if `observe_hidden=False`)."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        model: MDNRNN,
        start_states: StartStates,
        num_envs: int = 1,
        temperature: float = 1.0,
        max_steps: int = 1000,
        action_low: Sequence[float] | None = None,
        action_high: Sequence[float] | None = None,
        observe_hidden: bool = True,
        decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        done_threshold: float = 0.5,
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.start = start_states.to(self.device)
        self.num_envs = num_envs
        self.temperature = temperature
        self.max_steps = max_steps
        self.observe_hidden = observe_hidden
        self.decoder = decoder
        self.done_threshold = done_threshold
        self.render_mode = render_mode
        cfg = model.config
        obs_dim = cfg.z_dim + (cfg.hidden if observe_hidden else 0)
        low = np.asarray(action_low if action_low is not None else [-1.0] * cfg.action_dim)
        high = np.asarray(action_high if action_high is not None else [1.0] * cfg.action_dim)
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
        hidden = cfg.hidden
        self.z = torch.zeros(num_envs, cfg.z_dim, device=self.device)
        self.h = torch.zeros(num_envs, hidden, device=self.device)
        self.c = torch.zeros(num_envs, hidden, device=self.device)
        self.t = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)

    def _obs(self) -> np.ndarray:
        parts = [self.z, self.h] if self.observe_hidden else [self.z]
        return torch.cat(parts, dim=-1).cpu().numpy().astype(np.float32)

    def _restart(self, mask: np.ndarray) -> None:
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return
        picks = self.np_random.integers(0, len(self.start), size=len(idx))
        z, h, c = self.start.take(torch.as_tensor(picks, device=self.device))
        where = torch.as_tensor(idx, device=self.device)
        self.z[where], self.h[where], self.c[where] = z, h, c
        self.t[idx] = 0
        self._needs_reset[idx] = False

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
        s = dream_step(
            self.model,
            self.z,
            self.h,
            self.c,
            a,
            self.temperature,
            self._generator,
            self.done_threshold,
        )
        self.z, self.h, self.c = s.z, s.h, s.c
        self.t += 1
        reward = s.reward.cpu().numpy().astype(np.float64)
        terminated = s.done.cpu().numpy()
        truncated = (self.t >= self.max_steps) & ~terminated
        # Next-step autoreset: sub-envs that ended last step start afresh now, actions ignored.
        self._restart(resetting)
        reward[resetting] = 0.0
        terminated[resetting] = False
        truncated[resetting] = False
        self._needs_reset = terminated | truncated
        return self._obs(), reward, terminated, truncated, {}

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
    """One dream as a plain `gymnasium.Env` (for single-env RL code and `check_env`)."""

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
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> np.ndarray | None:
        frames = self._vec.render()
        return None if frames is None else frames[0]


def _make_dream(num_envs: int = 1, **kwargs: Any) -> DreamVectorEnv:
    return DreamVectorEnv(num_envs=num_envs, **kwargs)


if DREAM_ENV_ID not in gym.registry:
    gym.register(id=DREAM_ENV_ID, entry_point=DreamEnv, vector_entry_point=_make_dream)
