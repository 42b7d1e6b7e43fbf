"""A compact on-disk episode store, streamed and never loaded whole.

Layout of a store folder:

    store.json               format, version, frame shape, env id, policy (written atomically)
    episodes/ep_000000.npz   one compressed file per complete episode
    episodes/ep_000001.npz   ...

Each episode file (numpy `.npz`, deflate-compressed, loaded with `allow_pickle=False`) holds, for
an episode of T steps:

    obs         uint8   (T+1, H, W, 3)  observation before each step, plus the final one
    actions     float32 (T, A)          action taken after seeing obs[t]
    rewards     float32 (T,)            reward of that step
    terminated  bool    (T,)            env reported termination at that step
    truncated   bool    (T,)            time limit reached at that step
    raw_obs     uint8   (T+1, 96, 96, 3) optional: the env's full-size frames
    seed        int64   ()              the env seed of the episode
    policy      str     ()              policy name
    length      int64   ()              T (read without decompressing the frames)

An episode file is written to a temporary name and renamed when complete, so an episode is either
whole on disk or absent. The World Models recipe (10,000 episodes x 1,000 frames) is 123 GB as
raw 64x64 frames; here a CarRacing frame takes about 1 KB, and readers hold at most a few
episodes in memory at a time however large the store grows. `wm check-data`
(rollouts/check_data.py) reads every file in full and lists the bad ones.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gen_core.errors import UserError
from gen_core.io import atomic_write_bytes, atomic_write_text

STORE_FOLDER = "store"  # a run's episode store: <runs_dir>/<run_name>/store
FORMAT = "worldmodels-episode-store"
VERSION = 1
EPISODE_KEYS = ("obs", "actions", "rewards", "terminated", "truncated")
_EP_RE = re.compile(r"^ep_(\d{6,})\.npz$")


class CorruptEpisodeError(UserError):
    """An episode file cannot be read or is inconsistent."""


def episode_name(index: int) -> str:
    return f"ep_{index:06d}.npz"


def encode_episode(arrays: dict[str, Any]) -> bytes:
    """Compress one episode's arrays into `.npz` bytes (done on the worker, in parallel)."""
    for key in EPISODE_KEYS:
        if key not in arrays:
            raise ValueError(f"episode is missing {key!r}")
    data = {k: np.asarray(v) for k, v in arrays.items()}
    data["length"] = np.asarray(len(data["actions"]), dtype=np.int64)
    _check_consistent(data, "episode")
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    return buf.getvalue()


# What store.json fixes about each array of an episode: its dtype (exact, or a kind) and shape,
# None for a free size (T); "frames" and "action" stand for the store's frame shape and action_dim.
_LAYOUT: dict[str, tuple[str, tuple]] = {
    "obs": ("uint8", (None, "frames")),
    "raw_obs": ("uint8", (None, None, None, 3)),
    "actions": ("float", (None, "action")),
    "rewards": ("float", (None,)),
    "terminated": ("bool", (None,)),
    "truncated": ("bool", (None,)),
    "seed": ("int", ()),
    "length": ("int", ()),
}
_KINDS = {"float": "f", "int": "iu", "bool": "b", "uint8": None}


def _layout_problems(
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]], frame_shape: list, action_dim: int
) -> list[str]:
    """What does not match the store's layout, given (shape, dtype) of some arrays."""
    problems = []
    for key, (shape, dtype) in arrays.items():
        if key not in _LAYOUT:
            continue
        want_dtype, pattern = _LAYOUT[key]
        want: list[int | None] = []
        for w in pattern:
            want += list(frame_shape) if w == "frames" else [action_dim] if w == "action" else [w]
        kinds = _KINDS[want_dtype]
        dtype_ok = dtype.kind in kinds if kinds else dtype == np.dtype(want_dtype)
        shape_ok = len(shape) == len(want) and all(w in (None, n) for n, w in zip(shape, want))
        if not (dtype_ok and shape_ok):
            have = "x".join(map(str, shape)) or "scalar"
            expected = "x".join("T" if w is None else str(w) for w in want) or "scalar"
            problems.append(f"{key} is {dtype} {have}, the store holds {want_dtype} {expected}")
    return problems


def array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of an `.npz` file, read from its headers alone (cheap)."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            out[name.removesuffix(".npy")] = (shape, dtype)
    return out


def _check_consistent(data: dict[str, np.ndarray], where: str) -> None:
    t = len(data["actions"])
    problems = []
    if data["obs"].ndim != 4 or data["obs"].dtype != np.uint8:
        problems.append(f"obs has shape {data['obs'].shape} and dtype {data['obs'].dtype}")
    elif len(data["obs"]) != t + 1:
        problems.append(f"{len(data['obs'])} observations for {t} actions (expected {t + 1})")
    for key in ("rewards", "terminated", "truncated"):
        if key in data and len(data[key]) != t:
            problems.append(f"{key} has {len(data[key])} entries for {t} actions")
    if "length" in data and int(data["length"]) != t:
        problems.append(f"length says {int(data['length'])} but there are {t} actions")
    if problems:
        raise CorruptEpisodeError(f"{where}: inconsistent episode: {'; '.join(problems)}")


@dataclass
class StoreInfo:
    """What store.json records."""

    frame_shape: tuple[int, int, int]
    env_id: str
    action_dim: int
    raw: bool = False
    crop_bottom: int = 0  # rows cut from the env frame before resizing
    extra: dict[str, Any] | None = None
    # What `wm collect` made the episodes with (seed, policy, its params, max_steps): a later
    # `wm collect` into the store must match it, or the store would mix two recipes.
    recipe: dict[str, Any] | None = None


class EpisodeFolder:
    """A folder of one compressed `.npz` file per episode plus a JSON metadata file.

    Shared by the episode store (frames) and the latent store (VAE latents): listing complete
    episodes (temporary files ignored), safe loading (`allow_pickle=False`, a corrupt file named
    in one line), streamed sequence access. Subclasses set the names below and `_check`.
    """

    META = "store.json"  # metadata file name
    FORMAT = FORMAT  # the metadata's "format" value
    KIND = "episode store"  # for messages
    MAKE_HINT = "run 'wm collect'"  # how to make one

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.episode_dir = self.path / "episodes"
        self.meta_path = self.path / self.META

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def info(self) -> dict[str, Any]:
        """The parsed metadata (UserError if this is not such a folder)."""
        if not self.meta_path.is_file():
            article = "an" if self.KIND[0] in "aeiou" else "a"
            raise UserError(
                f"{self.path}: not {article} {self.KIND} (no {self.META}); {self.MAKE_HINT}"
            )
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.meta_path}: corrupt {self.KIND} metadata (not JSON)") from None
        if not isinstance(meta, dict) or meta.get("format") != self.FORMAT:
            raise UserError(f"{self.meta_path}: not a worldmodels {self.KIND}")
        return meta

    def indices(self) -> list[int]:
        """Indices of the complete episodes on disk, sorted (temporary files are ignored)."""
        if not self.episode_dir.is_dir():
            return []
        return sorted(
            int(m.group(1)) for p in self.episode_dir.iterdir() if (m := _EP_RE.match(p.name))
        )

    def __len__(self) -> int:
        return len(self.indices())

    def episode_path(self, index: int) -> Path:
        return self.episode_dir / episode_name(index)

    def _write_arrays(self, index: int, data: dict[str, np.ndarray]) -> Path:
        buf = io.BytesIO()
        np.savez_compressed(buf, **data)
        return self.write_episode_bytes(index, buf.getvalue())

    def write_episode_bytes(self, index: int, payload: bytes) -> Path:
        """Write an already compressed episode atomically: whole on disk or absent."""
        path = self.episode_path(index)
        atomic_write_bytes(path, payload)
        return path

    def _check(self, data: dict[str, np.ndarray], path: Path, keys: tuple[str, ...] | None):
        """Raise CorruptEpisodeError if the loaded arrays are inconsistent."""

    def load(self, index: int, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Load episode `index` (only `keys`, if given). Raises CorruptEpisodeError if bad."""
        path = self.episode_path(index)
        if not path.is_file():
            raise UserError(f"{path}: no such episode in {self.KIND} {self.path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = keys if keys is not None else tuple(npz.files)
                missing = [k for k in names if k not in npz.files]
                if missing:
                    raise CorruptEpisodeError(f"{path}: missing arrays {missing}")
                data = {k: npz[k] for k in names}
        except CorruptEpisodeError:
            raise
        except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as err:
            raise CorruptEpisodeError(
                f"{path}: corrupt or truncated episode file ({type(err).__name__}: {err}); "
                f"delete it and {self.MAKE_HINT} again"
            ) from None
        self._check(data, path, keys)
        return data

    def iter_episodes(
        self,
        keys: tuple[str, ...] | None = None,
        indices: list[int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (index, arrays) one episode at a time (sequence access)."""
        order = list(self.indices() if indices is None else indices)
        if shuffle:
            np.random.default_rng(seed).shuffle(order)
        for i in order:
            yield i, self.load(i, keys)


class EpisodeStore(EpisodeFolder):
    """Read and write a folder of episodes.

    Reading is streamed: `iter_episodes` yields one episode at a time and `iter_frames` keeps a
    shuffle buffer of a few episodes, so memory stays flat as the store grows.
    """

    # ---------------------------------------------------------------- creating and writing

    @classmethod
    def create(cls, path: str | Path, info: StoreInfo) -> EpisodeStore:
        """Open `path` for writing; make it if new, else check it matches `info`.

        A store whose store.json is gone but whose episode files remain gets it back only if
        every file holds the frames and actions `info` asks for."""
        if str(path).startswith(MINARI_PREFIX):
            raise UserError(f"store: {path} is a Minari dataset, read only; write to a folder")
        store = cls(path)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "frame_shape": list(info.frame_shape),
            "env_id": info.env_id,
            "action_dim": info.action_dim,
            "raw": info.raw,
            "crop_bottom": info.crop_bottom,
            **({"extra": info.extra} if info.extra else {}),
            **({"recipe": info.recipe} if info.recipe else {}),
        }
        try:
            if (store.path / "store.json").exists():
                old = store.info()
                for key in ("frame_shape", "env_id", "action_dim", "raw", "crop_bottom"):
                    if meta[key] != old.get(key, 0 if key == "crop_bottom" else None):
                        raise UserError(
                            f"{store.path}: existing store has {key}={old.get(key)!r}, this run "
                            f"asks for {meta[key]!r}; use another store path or matching settings"
                        )
                store._check_recipe(old.get("recipe"), info.recipe)
            else:
                store._check_orphans(meta)
                store.path.mkdir(parents=True, exist_ok=True)
                atomic_write_text(store.path / "store.json", json.dumps(meta, indent=2) + "\n")
            store.episode_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            why = "not a folder" if store.path.exists() and not store.path.is_dir() else err
            raise UserError(
                f"store: cannot write the episode store {store.path} "
                f"({getattr(why, 'strerror', None) or why}); "
                "set store (or runs_dir) to a writable folder"
            ) from None
        return store

    def _check_recipe(self, old: dict | None, new: dict | None) -> None:
        """Refuse to add episodes made another way to those on disk (`StoreInfo.recipe`)."""
        if not old or not new or not self.indices():
            return
        for key, value in new.items():
            if key in old and old[key] != value:
                raise UserError(
                    f"{self.path}: its episodes were collected with {key}={old[key]!r}, this run "
                    f"asks for {value!r}; collect with the same settings, or into another store"
                )

    def _check_orphans(self, meta: dict[str, Any]) -> None:
        """Episode files without a store.json: refuse unless they hold what `meta` describes."""
        for i in self.indices():
            path = self.episode_path(i)
            try:
                headers = array_headers(path)
            except (zipfile.BadZipFile, ValueError, OSError, EOFError):
                continue  # a corrupt file: wm check-data names it, wm collect leaves it
            problems = _layout_problems(headers, meta["frame_shape"], meta["action_dim"])
            if problems:
                raise UserError(
                    f"{self.path}: no store.json, and {path.name} does not match this run "
                    f"({problems[0]}); move the old episodes away or use another store"
                )

    def write_episode(self, index: int, payload: bytes | dict[str, Any]) -> Path:
        """Write episode `index` atomically (payload: `encode_episode` bytes or the arrays)."""
        if isinstance(payload, dict):
            payload = encode_episode(payload)
        return self.write_episode_bytes(index, payload)

    # ---------------------------------------------------------------- reading

    _meta: dict[str, Any] | None = None

    def _layout(self) -> tuple[list, int]:
        """(frame shape, action size) that store.json promises, read once."""
        if self._meta is None:
            self._meta = self.info()
        return self._meta["frame_shape"], self._meta["action_dim"]

    def _check(self, data, path, keys):
        """Every array as store.json promises (dtype, frame shape, action size) and, when the
        whole episode was read, every array there and their lengths consistent."""
        frame_shape, action_dim = self._layout()
        problems = _layout_problems(
            {k: (v.shape, v.dtype) for k, v in data.items()}, frame_shape, action_dim
        )
        if keys is None:
            missing = [k for k in EPISODE_KEYS if k not in data]
            if missing:
                problems.append(f"missing arrays {missing}")
        if problems:
            raise CorruptEpisodeError(
                f"{path}: does not match its store ({'; '.join(problems)}); delete it "
                "(wm check-data delete_bad=true) and run 'wm collect' again"
            )
        if keys is None or set(EPISODE_KEYS) <= set(data):
            _check_consistent(data, str(path))

    def length(self, index: int) -> int:
        """Number of steps of episode `index`, read without decompressing frames."""
        return int(self.load(index, ("length",))["length"])

    def iter_frames(
        self,
        batch_size: int,
        indices: list[int] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_episodes: int = 8,
        key: str = "obs",
        drop_last: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yield batches of frames (B, H, W, 3) uint8 drawn across episodes (e.g. VAE training).

        With `shuffle`, episodes are visited in random order and frames are mixed in a buffer of
        `buffer_episodes` episodes: memory is bounded by that buffer, not by the store's size.
        """
        rng = np.random.default_rng(seed)
        order = list(self.indices() if indices is None else indices)
        if shuffle:
            rng.shuffle(order)
        pending: list[np.ndarray] = []
        carry = np.empty((0,), dtype=np.uint8)
        for pos in range(0, len(order), max(1, buffer_episodes)):
            chunk = order[pos : pos + buffer_episodes]
            pending = [self.load(i, (key,))[key] for i in chunk]
            frames = np.concatenate(([carry] if len(carry) else []) + pending)
            del pending
            if shuffle:
                frames = frames[rng.permutation(len(frames))]
            n_full = len(frames) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                yield frames[start : start + batch_size]
            carry = frames[n_full:]
        if len(carry) and not drop_last:
            yield carry

    def check(self) -> list[tuple[Path, str]]:
        """Fully read every episode; return (path, problem) for each bad one."""
        bad = []
        for i in self.indices():
            try:
                self.load(i)
            except CorruptEpisodeError as err:
                path = self.episode_path(i)
                bad.append((path, str(err).removeprefix(f"{path}: ")))
        return bad


MINARI_PREFIX = "minari:"  # a store setting that names a Minari dataset instead of a folder


def open_store(path: str | Path) -> EpisodeStore:
    """The episode store a `store` setting names, for reading: a store folder, or a Minari
    dataset (rollouts/minari_store.py) as `minari:<dataset id or folder>` or its folder."""
    text = str(path)
    folder = Path(path)
    minari_folder = not (folder / "store.json").exists() and any(
        (f / "metadata.json").is_file() for f in (folder, folder / "data")
    )
    if text.startswith(MINARI_PREFIX) or minari_folder:
        from rollouts.minari_store import MinariStore  # minari only where it is asked for

        return MinariStore.open(text.removeprefix(MINARI_PREFIX))
    return EpisodeStore(path)
