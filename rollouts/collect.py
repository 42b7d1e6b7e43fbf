"""`wm collect`: episodes from a gymnasium pixel env, in parallel with Ray, into an episode store.

The collection engine (seeds per episode, resume, Ray workers) lives in `rollouts.recording`;
this module is the stage: its config class and `main`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gen_core.config import ConfigError
from rollouts.policies import POLICIES
from rollouts.recording import RecordingConfig, collect


@dataclass
class CollectConfig(RecordingConfig):
    """Settings of `wm collect`."""

    def validate(self) -> None:
        super().validate()
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")


def main(cfg: CollectConfig) -> int:
    """`wm collect`."""
    collect(cfg)
    return 0
