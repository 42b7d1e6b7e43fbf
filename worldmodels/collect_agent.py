"""`wm collect-agent`: add episodes driven by the current controller to a run's store.

World Models' answer to random rollouts that never reach the states a good controller reaches
(Ha & Schmidhuber 2018, section 5): collect with the current agent (V + M + C) plus exploration,
retrain M (and V) on all the data, evolve C again, repeat. Here the agent drives, with Gaussian
noise on its actions, and hands the wheel to the `explore` rollout policy for whole segments at
random, so the data shows both where the controller goes and what other actions do from there.

Episodes are appended to the store after the ones already on disk (set `episodes` to the new
total); `wm encode` then encodes only the new ones, and `wm train-m` trains on them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gen_core.config import ConfigError, setting
from rollouts.policies import ExplorePolicy
from rollouts.recording import RecordingConfig, collect
from worldmodels.agent import WorldModelAgent, load_driver
from worldmodels.layout import CONTROLLER_FOLDER, M_FOLDER, RunLayout


@dataclass
class CollectAgentConfig(RecordingConfig):
    """Settings of `wm collect-agent` (the collection settings, plus the agent's)."""

    policy: str = setting("agent", "label stored with each episode")
    controller: str = setting(
        "", f"controller checkpoint (default: the run's last round, {CONTROLLER_FOLDER}[_iterK])"
    )
    params: str = setting("auto", "which parameters: scored, mean, best or auto")
    vae: str = setting("", "V checkpoint (default: <run_dir>/vae/checkpoints)")
    m: str = setting("", f"M checkpoint (default: the run's last round, {M_FOLDER}[_iterK])")
    action_noise: float = setting(0.1, "std of Gaussian noise added to the agent's actions", min=0)
    explore: float = setting(
        0.3, "share of segments (~30 steps) driven by the explore policy", min=0, max=1
    )

    def validate(self) -> None:
        if self.params not in ("auto", "scored", "mean", "best"):
            raise ConfigError(f"params: expected auto, scored, mean or best, got {self.params!r}")
        super().validate()  # any label will do for `policy`


class ExploringAgent:
    """The World Models agent with exploration: action noise, and explore-policy segments."""

    name = "agent"

    def __init__(self, agent: WorldModelAgent, action_space, noise: float, explore: float):
        self.agent, self.space = agent, action_space
        self.noise, self.explore_prob = noise, explore
        self.explorer = ExplorePolicy(action_space, wait_prob=0.0)
        self.rng = np.random.default_rng()

    def reset(self, seed: int | None = None) -> None:
        self.agent.reset(seed)
        self.explorer.reset(seed)
        self.rng = np.random.default_rng(seed)
        self.exploring, self.left = False, 0

    def _act(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        if self.left <= 0:  # a new segment: the agent drives, or the explorer does
            self.exploring = self.rng.random() < self.explore_prob
            self.left = int(self.rng.geometric(1 / 30))
        self.left -= 1
        if self.exploring:
            return self.explorer(obs)
        noisy = action + self.noise * self.rng.standard_normal(action.shape)
        return np.clip(noisy, self.space.low, self.space.high).astype(np.float32)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.agent(obs, override=lambda a: self._act(obs, a))


class _AgentFactory:
    """Builds the exploring agent inside each worker (picklable for Ray)."""

    def __init__(self, parts: tuple, params: np.ndarray, noise: float, explore: float):
        self.parts, self.params, self.noise, self.explore = parts, params, noise, explore

    def __call__(self, action_space) -> ExploringAgent:
        import torch

        torch.set_num_threads(1)
        agent = WorldModelAgent(*self.parts)
        agent.set_params(self.params)
        return ExploringAgent(agent, action_space, self.noise, self.explore)


def main(cfg: CollectAgentConfig) -> int:
    layout = RunLayout.of(cfg)
    k = layout.last_round()  # C and the M it was evolved with belong to the same round
    parts, params = load_driver(
        Path(cfg.controller or layout.controller_checkpoints(k)),
        Path(cfg.vae or layout.vae_checkpoints),
        Path(cfg.m or layout.m_checkpoints(k)),
        cfg.store_path(),
        cfg.params,
    )
    collect(
        cfg,
        _AgentFactory(parts, params, cfg.action_noise, cfg.explore),
        stage=layout.collect_agent.name,
    )
    return 0
