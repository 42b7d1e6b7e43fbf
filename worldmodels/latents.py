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

import io
import json
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gen_core.errors import UserError
from gen_core.io import atomic_write_bytes, atomic_write_text

FORMAT = "worldmodels-latent-store"
VERSION = 1
LATENT_KEYS = ("mu", "logvar", "actions", "rewards", "terminated", "truncated")
_EP_RE = re.compile(r"^ep_(\d{6,})\.npz$")


class LatentStore:
    """Read and write a folder of encoded episodes (one `.npz` per episode)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.episode_dir = self.path / "episodes"
        self.meta_path = self.path / "latents.json"

    # ---------------------------------------------------------------- writing

    def write_info(self, meta: dict[str, Any]) -> None:
        """Write latents.json atomically (format and version are added)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.episode_dir.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": VERSION, **meta}
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2) + "\n")

    def write_episode(self, index: int, arrays: dict[str, np.ndarray]) -> Path:
        """Compress one encoded episode and write it atomically."""
        missing = [k for k in LATENT_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"encoded episode is missing {missing}")
        data = {k: np.asarray(v) for k, v in arrays.items()}
        data["length"] = np.asarray(len(data["actions"]), dtype=np.int64)
        buf = io.BytesIO()
        np.savez_compressed(buf, **data)
        path = self.episode_path(index)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def remove_episodes(self) -> None:
        """Delete every episode file (before re-encoding with another VAE)."""
        for i in self.indices():
            self.episode_path(i).unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def info(self) -> dict[str, Any]:
        """The parsed latents.json (UserError if this is not a latent store)."""
        if not self.meta_path.is_file():
            raise UserError(f"{self.path}: not a latent store (no latents.json); run 'wm encode'")
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.meta_path}: corrupt latent store metadata (not JSON)") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{self.meta_path}: not a worldmodels latent store")
        return meta

    def indices(self) -> list[int]:
        """Indices of the complete encoded episodes, sorted (temporary files are ignored)."""
        if not self.episode_dir.is_dir():
            return []
        return sorted(
            int(m.group(1)) for p in self.episode_dir.iterdir() if (m := _EP_RE.match(p.name))
        )

    def __len__(self) -> int:
        return len(self.indices())

    def episode_path(self, index: int) -> Path:
        return self.episode_dir / f"ep_{index:06d}.npz"

    def load(self, index: int, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Load encoded episode `index` (only `keys`, if given); UserError naming a bad file."""
        path = self.episode_path(index)
        if not path.is_file():
            raise UserError(f"{path}: no such episode in latent store {self.path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = keys if keys is not None else tuple(npz.files)
                missing = [k for k in names if k not in npz.files]
                if missing:
                    raise UserError(f"{path}: corrupt latent episode, missing arrays {missing}")
                data = {k: npz[k] for k in names}
        except UserError:
            raise
        except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as err:
            raise UserError(
                f"{path}: corrupt or truncated latent episode ({type(err).__name__}); "
                "delete it and run 'wm encode' again"
            ) from None
        if "mu" in data and "actions" in data and len(data["mu"]) != len(data["actions"]) + 1:
            raise UserError(
                f"{path}: corrupt latent episode, {len(data['mu'])} latents for "
                f"{len(data['actions'])} actions"
            )
        return data

    def iter_episodes(
        self,
        keys: tuple[str, ...] | None = None,
        indices: list[int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (index, arrays) one encoded episode at a time, in order or shuffled."""
        order = list(self.indices() if indices is None else indices)
        if shuffle:
            np.random.default_rng(seed).shuffle(order)
        for i in order:
            yield i, self.load(i, keys)
