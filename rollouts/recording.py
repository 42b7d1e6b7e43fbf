"""Recording episodes into a store: the pieces shared by `wm collect` and `wm collect-agent`.

`make_env` (a headless env by id) and `preprocess` (crop and resize a frame) are also what the
agent and the evaluators use. `collect` is the parallel collection engine: episode `i` always uses
the same env seed and policy seed (derived from the run seed and `i`), so a store is
reproducible whatever the number of workers, and an interrupted collection run again simply
writes the episodes that are not yet on disk. Workers return compressed episodes to the driver,
which writes them atomically: the store can live on the driver's disk even when the workers run
on a Ray cluster (`ray_address`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gen_core.config import setting
from gen_core.errors import UserError
from gen_core.runs import RunConfig, cores, progress, start_run
from rollouts.parallel import ActorPool
from rollouts.policies import Policy, make_policy
from rollouts.store import EpisodeStore, StoreInfo, encode_episode

# Larger frames are no use to a VAE here and fill the memory: an episode of 1,000 frames of
# 1024x1024 is 3 GB before compression.
MAX_FRAME_SIZE = 1024


@dataclass
class RecordingConfig(RunConfig):
    """Settings of a stage that records episodes into a store (`wm collect`, `wm collect-agent`).

    `validate` checks only the run settings; each stage's config adds its own checks.
    """

    env_id: str = setting(
        "CarRacingFast-v3", "gymnasium env id (CarRacingFast-v3 is pixel-identical to CarRacing-v3)"
    )
    episodes: int = setting(16, "number of episodes in the store", min=1)
    max_steps: int = setting(1000, "steps per episode at most (time limit)", min=1)
    policy: str = setting("correlated", "policy: uniform, correlated, explore or constant")
    policy_params: dict[str, Any] = setting(
        {}, "policy keyword arguments, e.g. {hold_mean: 10} or {action: [0, 1, 0]}"
    )
    frame_size: int = setting(
        64, "stored frames are resized to frame_size x frame_size", min=8, max=MAX_FRAME_SIZE
    )
    crop_bottom: int = setting(
        0,
        "rows cut from the bottom of the env frame before resizing (12 drops CarRacing's bar)",
        min=0,
    )
    keep_raw: bool = setting(False, "also store the env's full-size frames")
    workers: int | None = setting(None, "parallel env workers (default: one per core)", min=1)
    backend: Literal["ray", "inline"] = setting(
        "ray", "ray: parallel Ray actors; inline: one process, no Ray (debugging, tiny runs)"
    )
    ray_address: str | None = setting(
        None, "address of an existing Ray cluster (e.g. ray://host:10001 or auto); default: local"
    )
    store: str = setting("", "store folder (default: <runs_dir>/<run_name>/store)")

    def store_path(self) -> Path:
        return Path(self.store) if self.store else self.run_dir / "store"

    def n_workers(self) -> int:
        return self.workers or cores()


def episode_seeds(seed: int, index: int) -> tuple[int, int]:
    """(env seed, policy seed) of episode `index`: fixed by the run seed and the index alone."""
    env_seed, policy_seed = np.random.SeedSequence([seed, index]).generate_state(2)
    return int(env_seed % 2**31), int(policy_seed)


def make_env(env_id: str, max_steps: int):
    """Make a headless env by id, registering the toolkit's envs first."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    import gymnasium as gym

    import rollouts.envs  # noqa: F401  (registers CarRacingFast-v3)

    try:
        return gym.make(env_id, max_episode_steps=max_steps)
    except gym.error.Error as err:
        raise UserError(f"env_id: cannot make {env_id!r} ({err})") from None


def preprocess(frame: np.ndarray, size: int, crop_bottom: int = 0) -> np.ndarray:
    """Crop `crop_bottom` rows, then area-resize to (size, size, 3) uint8."""
    from PIL import Image

    if crop_bottom:
        frame = frame[: frame.shape[0] - crop_bottom]
    if frame.shape[0] == size and frame.shape[1] == size:
        return np.ascontiguousarray(frame)
    img = Image.fromarray(frame).resize((size, size), Image.Resampling.BOX)
    return np.asarray(img)


PolicyFactory = Callable[[Any], Policy]  # action space -> policy


def run_episode(env, policy, env_seed: int, policy_seed: int, cfg: RecordingConfig) -> dict:
    """Play one episode; return its arrays in the store's layout."""
    obs, _ = env.reset(seed=env_seed)
    policy.reset(policy_seed)
    frames, raw = [preprocess(obs, cfg.frame_size, cfg.crop_bottom)], [obs] if cfg.keep_raw else []
    actions, rewards, terms, truncs = [], [], [], []
    for _ in range(cfg.max_steps):
        action = np.asarray(policy(obs), dtype=np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(preprocess(obs, cfg.frame_size, cfg.crop_bottom))
        if cfg.keep_raw:
            raw.append(obs)
        actions.append(action)
        rewards.append(reward)
        terms.append(terminated)
        truncs.append(truncated)
        if terminated or truncated:
            break
    out = {
        "obs": np.stack(frames),
        "actions": np.stack(actions).astype(np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminated": np.asarray(terms, dtype=bool),
        "truncated": np.asarray(truncs, dtype=bool),
        "seed": np.asarray(env_seed, dtype=np.int64),
        "policy": np.asarray(cfg.policy),
    }
    if cfg.keep_raw:
        out["raw_obs"] = np.stack(raw)
    return out


class EpisodeWorker:
    """Owns one env and one policy; plays episodes on request (a Ray actor, or inline)."""

    def __init__(self, cfg: RecordingConfig, policy_factory: PolicyFactory | None = None):
        self.cfg = cfg
        self.env = make_env(cfg.env_id, cfg.max_steps)
        if policy_factory is not None:
            self.policy = policy_factory(self.env.action_space)
        else:
            self.policy = make_policy(cfg.policy, self.env.action_space, **cfg.policy_params)

    def play(self, index: int) -> tuple[int, bytes, int, float]:
        """(index, compressed episode, steps, return) of episode `index`."""
        env_seed, policy_seed = episode_seeds(self.cfg.seed, index)
        ep = run_episode(self.env, self.policy, env_seed, policy_seed, self.cfg)
        return index, encode_episode(ep), len(ep["actions"]), float(ep["rewards"].sum())


def collect_recipe(cfg: RecordingConfig) -> dict[str, Any]:
    """What fixes the episodes of `wm collect` besides the store's frame settings: kept in
    store.json, so that collecting more into the store with other settings is refused."""
    recipe = {
        "seed": cfg.seed,
        "policy": cfg.policy,
        "policy_params": cfg.policy_params,
        "max_steps": cfg.max_steps,
    }
    return json.loads(json.dumps(recipe))  # as store.json will read it back


def _store_info(cfg: RecordingConfig, policy_factory: PolicyFactory | None = None) -> StoreInfo:
    env = make_env(cfg.env_id, cfg.max_steps)
    try:
        if policy_factory is None:
            make_policy(cfg.policy, env.action_space, **cfg.policy_params)  # fail early, one line
        return StoreInfo(
            frame_shape=(cfg.frame_size, cfg.frame_size, 3),
            env_id=cfg.env_id,
            action_dim=int(np.prod(env.action_space.shape)),
            raw=cfg.keep_raw,
            crop_bottom=cfg.crop_bottom,
            recipe=None if policy_factory is not None else collect_recipe(cfg),
        )
    finally:
        env.close()


def _inline_results(cfg: RecordingConfig, todo: list[int], policy_factory=None):
    worker = EpisodeWorker(cfg, policy_factory)
    for index in todo:
        yield worker.play(index)


@dataclass
class CollectStats:
    """What one collection run did (frames counted as stored observations)."""

    episodes: int
    frames: int
    seconds: float  # from the workers being ready to the last episode written
    bytes_written: int
    returns: list[float]

    @property
    def frames_per_s(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    @property
    def bytes_per_frame(self) -> float:
        return self.bytes_written / max(self.frames, 1)


def collect(
    cfg: RecordingConfig, policy_factory: PolicyFactory | None = None, stage: str = "collect"
) -> CollectStats:
    """Collect `cfg.episodes` episodes into the store, skipping those already on disk.

    `policy_factory(action_space) -> policy` replaces the built-in policy named by `cfg.policy`
    (which then only labels the episodes), e.g. a trained agent for the iterative loop.
    """
    run = start_run(cfg, stage, torch_needed=False)
    store = EpisodeStore.create(cfg.store_path(), _store_info(cfg, policy_factory))
    have = set(store.indices())
    todo = [i for i in range(cfg.episodes) if i not in have]
    run.log.info(
        f"collect: {cfg.env_id}, policy {cfg.policy}, {cfg.episodes} episodes "
        f"({len(have & set(range(cfg.episodes)))} already on disk), store {store.path}"
    )
    stats = CollectStats(0, 0, 0.0, 0, [])
    if not todo:
        run.log.info("collect: nothing to do, every episode is on disk")
        run.close()
        return stats
    _ = run.tb  # open TensorBoard (a slow import) before timing, not on the first episode
    pool = None
    if cfg.backend == "ray":  # built before timing starts: workers' start-up is not collection
        n = min(cfg.n_workers(), len(todo))
        pool = ActorPool(EpisodeWorker, (cfg, policy_factory), n=n, ray_address=cfg.ray_address)
        results = (result for _, result in pool.map_unordered("play", todo))
    else:
        results = _inline_results(cfg, todo, policy_factory)
    t0 = time.perf_counter()
    bar = progress(total=len(todo), unit="ep", desc="collect", disable=not cfg.progress)
    try:
        for index, payload, steps, ret in results:
            store.write_episode(index, payload)
            stats.episodes += 1
            stats.frames += steps + 1
            stats.bytes_written += len(payload)
            stats.returns.append(ret)
            run.scalars(index, episode_return=ret, episode_steps=steps)
            stats.seconds = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(fps=f"{stats.frames_per_s:.0f}", ret=f"{ret:.1f}")
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    run.log.info(
        f"collect: {stats.episodes} episodes, {stats.frames} frames in {stats.seconds:.1f}s "
        f"({stats.frames_per_s:.0f} frames/s), {stats.bytes_per_frame:.0f} bytes/frame, "
        f"mean return {np.mean(stats.returns):.1f} +- {np.std(stats.returns):.1f}"
    )
    run.close()
    return stats
