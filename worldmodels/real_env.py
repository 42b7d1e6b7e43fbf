"""Real-env episodes played in parallel: the Ray worker that plays them, and the tracks that
scoring uses.

`wm train-controller` (mode=real, and scoring the mean parameters) and `wm evaluate` play a
controller (V + M + C) or a baseline policy in Ray actors that each hold one env; the
parameters to play arrive with each episode, so one pool serves a whole CMA-ES run.
"""

from __future__ import annotations

import numpy as np
import torch

from rollouts.policies import make_policy
from rollouts.recording import make_env
from worldmodels.agent import WorldModelAgent, play_episode

# Evaluation tracks start here, far above the seeds training draws from, so a controller is
# never scored on a track it was evolved on.
EVAL_SEED_BASE = 1_000_000


def eval_seeds(seed: int, episodes: int) -> list[int]:
    """Env seeds of `episodes` evaluation tracks of run seed `seed` (the same for every policy)."""
    return [EVAL_SEED_BASE + seed * 10_000 + i for i in range(episodes)]


def real_returns(policy, env_id: str, seeds: list[int], max_steps: int) -> np.ndarray:
    """Returns of `policy` (an agent or any `obs -> action`) on the tracks `seeds`, one after
    another in this process (`wm evaluate` spreads them over Ray workers)."""
    env = make_env(env_id, max_steps)
    try:
        return np.array([play_episode(env, policy, s, max_steps)[0] for s in seeds])
    finally:
        env.close()


class RealEnvWorker:
    """A Ray actor holding one env and a policy: V + M + C when `parts` is given (its
    parameters arrive with each episode), else a built-in rollout policy by name."""

    def __init__(
        self,
        parts: tuple | None,
        env_id: str,
        max_steps: int,
        policy: str = "controller",
        policy_params: dict | None = None,
    ):
        torch.set_num_threads(1)  # one env per core: more threads per actor only contend
        self.env = make_env(env_id, max_steps)
        self.max_steps = max_steps
        if parts is not None:
            self.policy = WorldModelAgent(*parts)  # (V, M, C's spec, frame settings)
        else:
            self.policy = make_policy(policy, self.env.action_space, **(policy_params or {}))

    def play(self, item: tuple[int, np.ndarray | None, int]) -> float:
        """Return of one episode: item = (caller's tag, parameters or None, env seed)."""
        _, params, seed = item
        if params is not None:
            self.policy.set_params(params)
        total, *_ = play_episode(self.env, self.policy, seed, self.max_steps)
        return total
