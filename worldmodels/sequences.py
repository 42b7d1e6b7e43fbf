"""M's training data: encoded episodes as sequences of (z, action, reward target, end).

V's latent episodes (`wm encode`) become `Episode`s with the reward head's target already made
(`reward_targets`), then chunks of `seq_len` steps (truncated backprop through time, a random
offset per epoch so chunk borders move) with z drawn afresh from V's posterior each epoch, as
World Models did. Shared by `wm train-m` (training) and `wm fidelity` (M's open-loop
diagnostics score the same targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Steps averaged by the dense reward targets (progress, trailing): about what CarRacing takes
# to cross one track tile at speed, so a tile's bonus is spread over the steps that earned it.
REWARD_WINDOW = 20


@dataclass
class Episode:
    mu: np.ndarray  # (T+1, z_dim)
    logvar: np.ndarray  # (T+1, z_dim)
    actions: np.ndarray  # (T, action_dim)
    rewards: np.ndarray  # (T,) the reward head's target
    done: np.ndarray  # (T,) 1 where the env terminated


def reward_targets(
    rewards: np.ndarray, target: str, window: int = REWARD_WINDOW, clip: Sequence[float] = ()
) -> np.ndarray:
    """The reward head's target per step t.

    raw: r_t. progress: mean of r_t..r_{t+window-1} (shorter at the end). trailing: mean of
    r_{t-window+1}..r_t (shorter at the start). `clip` = (low, high) clips r first.
    """
    rewards = rewards.astype(np.float32)
    if len(clip):
        rewards = np.clip(rewards, clip[0], clip[1])
    if target == "raw":
        return rewards
    csum = np.concatenate([[0.0], np.cumsum(rewards, dtype=np.float64)])
    idx = np.arange(len(rewards))
    if target == "trailing":
        begin = np.maximum(idx + 1 - window, 0)
        return ((csum[idx + 1] - csum[begin]) / (idx + 1 - begin)).astype(np.float32)
    end = np.minimum(idx + window, len(rewards))
    return ((csum[end] - csum[idx]) / (end - idx)).astype(np.float32)


def load_episodes(store, reward_target: str, reward_clip: Sequence[float]) -> list[Episode]:
    """Every episode of a latent store, with its reward-head targets."""
    return [
        Episode(
            mu=ep["mu"].astype(np.float32),
            logvar=ep["logvar"].astype(np.float32),
            actions=ep["actions"].astype(np.float32),
            rewards=reward_targets(ep["rewards"], reward_target, clip=reward_clip),
            done=ep["terminated"].astype(np.float32),
        )
        for _, ep in store.iter_episodes()
    ]


def chunk_bounds(length: int, seq_len: int, first: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] cutting `length` steps into chunks of `seq_len` steps, with a border at
    `first` too (a shorter first chunk, so borders can move between epochs)."""
    cuts = sorted({0, length, *range(first, length, seq_len)})
    return list(zip(cuts[:-1], cuts[1:]))


def make_chunks(
    episodes: list[Episode],
    seq_len: int,
    rng: np.random.Generator,
    z_noise: float,
    offset: bool,
) -> dict[str, torch.Tensor]:
    """Cut episodes into padded chunks of `seq_len` steps, z drawn afresh from V's posterior
    with its std scaled by `z_noise` (1: World Models' full draw; 0: V's mean).

    Returns tensors z (N, L, z), z_next (N, L, z), actions (N, L, a), rewards, done, mask (N, L).
    """
    rows = {k: [] for k in ("z", "z_next", "actions", "rewards", "done", "mask")}
    for ep in episodes:
        z = ep.mu
        if z_noise > 0:
            eps = rng.standard_normal(ep.mu.shape, np.float32)
            z = ep.mu + z_noise * np.exp(0.5 * ep.logvar) * eps
        T = len(ep.actions)
        start = int(rng.integers(0, seq_len)) if offset else 0
        for s, e in chunk_bounds(T, seq_len, start):
            pad = seq_len - (e - s)

            def padded(x, pad=pad):
                return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

            rows["z"].append(padded(z[s:e]))
            rows["z_next"].append(padded(z[s + 1 : e + 1]))
            rows["actions"].append(padded(ep.actions[s:e]))
            rows["rewards"].append(padded(ep.rewards[s:e]))
            rows["done"].append(padded(ep.done[s:e]))
            rows["mask"].append(padded(np.ones(e - s, np.float32)))
    return {k: torch.from_numpy(np.stack(v)) for k, v in rows.items()}


def training_batches(
    episodes: list[Episode],
    seq_len: int,
    batch_size: int,
    z_noise: float,
    rng: np.random.Generator,
) -> list[dict[str, torch.Tensor]]:
    """One epoch's shuffled batches of chunks."""
    chunks = make_chunks(episodes, seq_len, rng, z_noise, True)
    order = torch.from_numpy(rng.permutation(len(chunks["z"])))
    return [{k: v[idx] for k, v in chunks.items()} for idx in order.split(batch_size)]
