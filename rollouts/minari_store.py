"""Episode stores as Minari datasets (Farama's offline-RL format, beside gymnasium) and back.

`export_store` writes a store's episodes as a local Minari dataset (HDF5): observations (the
store's frames, T+1 per episode), actions, rewards, terminations, truncations, the env's spec
and action space, each episode's env seed; what Minari has no field for rides along losslessly
(store.json as the dataset's `worldmodels_store` metadata, each episode's index and policy as its
metadata, `raw_obs` as the infos of the T+1 observations). `MinariStore` reads a Minari dataset,
ours or anyone's whose observations are RGB frames, as an episode store: every stage that reads
a store takes one as `store=minari:<dataset id or folder>`. `import_dataset` writes it back as a
store folder. Nothing is downloaded: a dataset id is looked up under MINARI_DATASETS_PATH (Minari's
own setting; default ~/.minari/datasets) or the folder given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gen_core.errors import UserError
from rollouts.store import FORMAT, VERSION, CorruptEpisodeError, EpisodeStore, StoreInfo

NOT_INSTALLED = 'Minari datasets need the minari extra: pip install -e ".[minari]"'
STORE_META = "worldmodels_store"  # the dataset metadata key holding the store's store.json


def _minari():
    try:
        import h5py  # noqa: F401  (the HDF5 format's reader; minari imports it lazily)
        import minari
    except ImportError:
        raise UserError(NOT_INSTALLED) from None
    return minari


def datasets_root(path: str | Path = "") -> Path:
    """The folder of local Minari datasets: `path` if given, else Minari's own choice."""
    if path:
        return Path(path)
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


@contextlib.contextmanager
def _datasets_path(root: Path):
    """Minari writes under MINARI_DATASETS_PATH: point it at `root` for the block."""
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = before


def _spaces(info: dict[str, Any]):
    """(observation space, action space, env spec or None) of a store."""
    import gymnasium as gym

    import rollouts.envs  # noqa: F401  (registers CarRacingFast-v3)

    obs = gym.spaces.Box(0, 255, tuple(info["frame_shape"]), np.uint8)
    spec = gym.spec(info["env_id"]) if info["env_id"] in gym.registry else None
    if spec is not None:
        env = gym.make(spec)
        action = env.action_space
        env.close()
    else:
        action = gym.spaces.Box(-np.inf, np.inf, (info["action_dim"],), np.float32)
    return obs, action, spec


def _buffer(k: int, ep: dict[str, np.ndarray]):
    from minari.data_collector import EpisodeBuffer

    extra = {"raw_obs": ep["raw_obs"]} if "raw_obs" in ep else None  # one per observation
    return EpisodeBuffer(
        id=k,
        seed=int(ep["seed"]) if "seed" in ep else None,
        observations=ep["obs"],
        actions=ep["actions"],
        rewards=ep["rewards"],
        terminations=ep["terminated"],
        truncations=ep["truncated"],
        infos=extra,
    )


def export_store(
    store: EpisodeStore, dataset_id: str, root: Path, jpeg: bool = False, progress=None
) -> Path:
    """Write every episode of `store` as the Minari dataset `dataset_id` under `root`; its
    folder. Written under a temporary folder and moved into place: whole or absent.

    jpeg: JPEG-encode the frames (Minari's default; about 9x smaller, but lossy)."""
    minari = _minari()
    info = store.info()
    final = root / dataset_id
    if final.exists():
        raise UserError(f"{final}: a Minari dataset is already there; delete it or pick another")
    obs_space, action_space, spec = _spaces(info)
    tmp = root / f".{dataset_id.replace('/', '_')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset = None
    try:
        with _datasets_path(tmp), warnings.catch_warnings():
            # Minari asks for an author, an email and a code link: not ours to invent.
            warnings.filterwarnings("ignore", category=UserWarning, module="minari")
            for k, i in enumerate(store.indices()):
                ep = store.load(i)
                if dataset is None:
                    dataset = minari.create_dataset_from_buffers(
                        dataset_id,
                        [_buffer(k, ep)],
                        env=spec,
                        observation_space=obs_space,
                        action_space=action_space,
                        algorithm_name=str(ep.get("policy", "unknown")),
                        description=(
                            f"worldmodels episode store {store.path}: observations are its "
                            f"{'x'.join(map(str, info['frame_shape']))} frames of {info['env_id']}"
                        ),
                        data_format="hdf5",
                        jpeg_encoding=jpeg,
                    )
                else:
                    dataset.update_dataset_from_buffer([_buffer(k, ep)])
                meta = {
                    "store_index": i,
                    **({"policy": str(ep["policy"])} if "policy" in ep else {}),
                }
                dataset.storage.update_episode_metadata([meta], [k])
                if progress is not None:
                    progress.update(1)
            if dataset is None:
                raise UserError(f"{store.path}: no episodes to export")
            dataset.storage.update_metadata({STORE_META: info})
        top = Path(dataset_id).parts[0]  # move the namespace whole where it is new
        if not (root / top).exists():
            os.replace(tmp / top, root / top)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / dataset_id, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class MinariStore(EpisodeStore):
    """A Minari dataset read as an episode store (read only)."""

    KIND = "Minari dataset"
    MAKE_HINT = "run 'wm export-minari'"

    @classmethod
    def open(cls, spec: str) -> MinariStore:
        """The dataset `spec` names: a dataset folder, or an id under `datasets_root()`."""
        folder = Path(spec) if Path(spec).is_dir() else datasets_root() / spec
        data = folder / "data" if (folder / "data").is_dir() else folder
        if not (data / "metadata.json").is_file():
            raise UserError(
                f"minari:{spec}: no Minari dataset at {folder} (datasets are looked up under "
                "MINARI_DATASETS_PATH, or give the dataset's folder); 'wm export-minari' writes one"
            )
        minari = _minari()
        store = cls(folder)
        try:
            store.dataset = minari.MinariDataset(data)
        except (ValueError, KeyError, OSError) as err:
            raise UserError(f"{folder}: unreadable Minari dataset ({err})") from None
        meta = list(store.dataset.storage.get_episode_metadata(store.dataset.episode_indices))
        store._ids = {int(m.get("store_index", k)): k for k, m in enumerate(meta)}
        store._episode_meta = meta
        return store

    def exists(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        """store.json of the store this dataset was exported from, or one that describes it."""
        if self._meta is not None:
            return self._meta
        metadata = self.dataset.storage.metadata
        if STORE_META in metadata:
            self._meta = dict(metadata[STORE_META])
            return self._meta
        obs, action = self.dataset.observation_space, self.dataset.action_space
        frames = getattr(obs, "shape", None)
        if obs.dtype != np.uint8 or frames is None or len(frames) != 3 or frames[-1] != 3:
            raise UserError(f"{self.path}: its observations are not RGB frames ({obs})")
        if action.dtype.kind != "f" or len(action.shape) != 1:
            raise UserError(f"{self.path}: its actions are not a vector of floats ({action})")
        spec = self.dataset.env_spec
        self._meta = {
            "format": FORMAT,
            "version": VERSION,
            "frame_shape": list(frames),
            "env_id": spec.id if spec is not None else "unknown",
            "action_dim": int(action.shape[0]),
            "raw": False,
            "crop_bottom": 0,
        }
        return self._meta

    def indices(self) -> list[int]:
        return sorted(self._ids)

    def load(self, index: int, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        if index not in self._ids:
            raise UserError(f"{self.path}: no episode {index} in this Minari dataset")
        k = self._ids[index]
        ep = next(iter(self.dataset.storage.get_episodes([k])))
        meta = self._episode_meta[k]
        data = {
            "obs": np.asarray(ep["observations"]),
            "actions": np.asarray(ep["actions"]),
            "rewards": np.asarray(ep["rewards"]),
            "terminated": np.asarray(ep["terminations"]),
            "truncated": np.asarray(ep["truncations"]),
            **{k_: np.asarray(v) for k_, v in (ep["infos"] or {}).items() if k_ == "raw_obs"},
            "length": np.asarray(len(ep["rewards"]), dtype=np.int64),
        }
        if meta.get("seed") is not None:
            data["seed"] = np.asarray(meta["seed"], dtype=np.int64)
        if "policy" in meta:
            data["policy"] = np.asarray(str(meta["policy"]))
        if keys is not None:
            missing = [key for key in keys if key not in data]
            if missing:
                raise CorruptEpisodeError(f"{self.path}: episode {index} has no {missing}")
            data = {key: data[key] for key in keys}
        self._check(data, self.path, keys)
        return data

    def length(self, index: int) -> int:
        return int(self._episode_meta[self._ids[index]]["total_steps"])


def import_dataset(spec: str, out: str | Path) -> EpisodeStore:
    """Write the Minari dataset `spec` (id or folder) as an episode store folder `out`."""
    src = MinariStore.open(spec)
    meta = src.info()
    dst = EpisodeStore.create(
        out,
        StoreInfo(
            frame_shape=tuple(meta["frame_shape"]),
            env_id=meta["env_id"],
            action_dim=meta["action_dim"],
            raw=meta.get("raw", False),
            crop_bottom=meta.get("crop_bottom", 0),
            extra=meta.get("extra"),
            recipe=meta.get("recipe"),
        ),
    )
    for i in src.indices():
        dst.write_episode(i, src.load(i))
    return dst
