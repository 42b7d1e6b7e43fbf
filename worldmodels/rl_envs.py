"""A finished run's dream as a gymnasium env for any RL library, and the agent that plays what
was learnt there in the real env.

    kwargs, parts = dream_from_run("runs/carracing_small")
    env = gymnasium.make(DREAM_ENV_ID, **kwargs)  # or SB3: make_vec_env(DREAM_ENV_ID, ...)
    ...  # train anything on env: it observes [z, h] and acts as C would
    agent = WorldModelAgent(*parts, act=policy)  # V encodes, M remembers, `policy` acts

The dream is the one C is evolved in (`wm train-controller mode=dream`): M and V of the run's
last round, starts drawn from the run's encoded episodes after `dream.warmup` real steps, the
action bounds of the real env. See examples/sb3_ppo_dream.py.
"""

from __future__ import annotations

from pathlib import Path

from rollouts.recording import make_env
from rollouts.store import open_store
from worldmodels.agent import load_agent_parts
from worldmodels.dream import DreamConfig, DreamStarts
from worldmodels.latents import dream_episodes
from worldmodels.layout import RunLayout


def dream_from_run(
    run_dir: str | Path,
    dream: DreamConfig | None = None,
    start_states: int = 512,
    max_start: int | None = 1000,
    max_steps: int = 1000,
    seed: int = 0,
    render: bool = False,
) -> tuple[dict, tuple]:
    """(keyword arguments of `gymnasium.make(DREAM_ENV_ID, ...)`, the agent's parts (V, M, C's
    spec, frame settings) for `WorldModelAgent`) of the run in `run_dir`.

    start_states: dream starts drawn from the encoded episodes (`seed` picks them); max_start:
    latest step after the warm-up a start may be at (None: anywhere); max_steps: the dream's time
    limit; render: decode z with V in `render()`.
    """
    layout = RunLayout(Path(run_dir))
    k = layout.last_round()  # the M the run's last controller was evolved with
    parts = load_agent_parts(layout.vae_checkpoints, layout.m_checkpoints(k), layout.store)
    vae, m, _, _ = parts
    dream = dream or DreamConfig()
    episodes = dream_episodes(layout.latents)
    stepper = m.stepper()
    starts = DreamStarts.from_episodes(
        stepper, episodes, start_states, dream.warmup, max_start, seed
    )
    env = make_env(open_store(layout.store).info()["env_id"], max_steps)
    space = env.action_space
    env.close()
    kwargs = dict(
        model=stepper,
        starts=starts,
        dream=dream,
        max_steps=max_steps,
        action_low=space.low.tolist(),
        action_high=space.high.tolist(),
        decoder=vae.decode if render else None,
        render_mode="rgb_array" if render else None,
    )
    return kwargs, parts
