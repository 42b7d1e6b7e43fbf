"""Gymnasium env variants used for rollouts.

Importing this package registers ``CarRacingFast-v3``: stock ``CarRacing-v3`` physics, track and
rewards with observations that are pixel-identical to stock but rendered several times faster
(see ``rollouts.envs.car_racing_fast``).
"""

import gymnasium

CAR_RACING_FAST_ID = "CarRacingFast-v3"

# gymnasium warns when an id is registered twice (e.g. after a module reload); skip it instead.
if CAR_RACING_FAST_ID not in gymnasium.registry:
    gymnasium.register(
        id=CAR_RACING_FAST_ID,
        entry_point="rollouts.envs.car_racing_fast:CarRacingFast",
        max_episode_steps=1000,
        reward_threshold=900,
    )

__all__ = ["CAR_RACING_FAST_ID"]
