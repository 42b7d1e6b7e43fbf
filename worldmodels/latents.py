"""The latent store: each stored episode encoded by the VAE, beside its actions and rewards.

`wm encode` writes it; the MDN-RNN (M) reads it as sequences. Layout of a latent store folder:

    latents.json             format, version, z_dim, dtype, the VAE checkpoint's step and hash
    episodes/ep_000000.npz   one compressed file per episode (written atomically)

Each episode file, for an episode of T steps (allow_pickle=False, like the episode store):

    mu          float32 (T+1, z_dim)  posterior mean of each observation (float16 if asked)
    logvar      float32 (T+1, z_dim)  posterior log-variance of each observation
    actions     float32 (T, A)        copied from the episode store
    rewards     float32 (T,)
    terminated  bool    (T,)
    truncated   bool    (T,)
    length      int64   ()            T

A latent z_t is drawn as mu_t + exp(logvar_t / 2) * eps, so M can train on fresh samples of the
posterior each epoch instead of on one fixed sample.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gen_core.errors import UserError
from gen_core.io import atomic_write_text
from rollouts.store import CorruptEpisodeError, EpisodeFolder

FORMAT = "worldmodels-latent-store"
VERSION = 1
LATENT_KEYS = ("mu", "logvar", "actions", "rewards", "terminated", "truncated")


class LatentStore(EpisodeFolder):
    """Read and write a folder of encoded episodes (one `.npz` per episode)."""

    META = "latents.json"
    FORMAT = FORMAT
    KIND = "latent store"
    MAKE_HINT = "run 'wm encode'"

    def write_info(self, meta: dict[str, Any]) -> None:
        """Write latents.json atomically (format and version are added)."""
        self.episode_dir.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": VERSION, **meta}
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2) + "\n")

    def write_episode(self, index: int, arrays: dict[str, np.ndarray]):
        """Compress one encoded episode and write it atomically."""
        missing = [k for k in LATENT_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"encoded episode is missing {missing}")
        data = {k: np.asarray(v) for k, v in arrays.items()}
        data["length"] = np.asarray(len(data["actions"]), dtype=np.int64)
        return self._write_arrays(index, data)

    def remove_episodes(self) -> None:
        """Delete every episode file (before re-encoding with another VAE)."""
        for i in self.indices():
            self.episode_path(i).unlink(missing_ok=True)

    def _check(self, data, path, keys):
        if "mu" in data and "actions" in data and len(data["mu"]) != len(data["actions"]) + 1:
            raise CorruptEpisodeError(
                f"{path}: corrupt latent episode, {len(data['mu'])} latents for "
                f"{len(data['actions'])} actions"
            )


def dream_episodes(path) -> list[dict[str, np.ndarray]]:
    """The encoded episodes (`mu`, `actions`) of the latent store at `path`, that dreams start
    from; one line for the user when there are none."""
    latents = LatentStore(path)
    episodes = [ep for _, ep in latents.iter_episodes(keys=("mu", "actions"))]
    if not episodes:
        raise UserError(f"{latents.path}: no encoded episodes; run 'wm encode' first")
    return episodes
