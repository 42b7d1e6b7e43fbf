"""Episode stores as Minari datasets (issue 27): `wm export-minari`, `store=minari:<id>` for the
stages that read a store, and a lossless round trip store -> Minari -> store."""

import json
import sys

import numpy as np
import pytest
import torch
from test_hardening import one_error_line
from test_vae import squares

from gen_core.checkpoint import load_checkpoint
from rollouts.store import EpisodeStore, StoreInfo
from worldmodels.cli import main as wm
from worldmodels.latents import LatentStore

minari = pytest.importorskip("minari")
from rollouts.minari_store import MinariStore, import_dataset  # noqa: E402


def store_of(path, indices=(0, 2, 5), steps=12, raw=True):
    """A store with all an episode can hold: raw frames, seeds, policies, ends of both kinds,
    a recipe, and a gap in its indices."""
    rng = np.random.default_rng(0)
    recipe = {"seed": 3, "policy": "explore", "policy_params": {}, "max_steps": steps}
    info = StoreInfo((16, 16, 3), "CarRacingFast-v3", 3, raw=raw, recipe=recipe)
    store = EpisodeStore.create(path, info)
    for i in indices:
        n = steps - i  # episodes of different lengths
        ep = {
            "obs": squares(rng, n + 1),
            "actions": rng.uniform([-1, 0, 0], [1, 1, 1], (n, 3)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "terminated": np.arange(n) == n - 1 if i % 2 else np.zeros(n, bool),
            "truncated": np.zeros(n, bool) if i % 2 else np.arange(n) == n - 1,
            "seed": np.int64(1000 + i),
            "policy": np.str_("explore"),
        }
        if raw:
            ep["raw_obs"] = rng.integers(0, 256, (n + 1, 24, 24, 3), dtype=np.uint8)
        store.write_episode(i, ep)
    return store


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """Minari's datasets folder, local to the test."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def test_round_trip_store_minari_store_is_lossless(tmp_path, datasets):
    store = store_of(tmp_path / "toy" / "store")
    args = ["export-minari", f"runs_dir={tmp_path}", "run_name=toy", "progress=false"]
    assert wm(args) == 0

    # What Minari users see: the standard fields, the env's spec and action space.
    ds = minari.load_dataset("worldmodels/toy-v0")
    assert ds.total_episodes == 3 and ds.total_steps == 12 + 10 + 7
    assert ds.env_spec.id == "CarRacingFast-v3" and ds.action_space.shape == (3,)
    ep = ds[1]  # the store's episode 2
    original = store.load(2)
    np.testing.assert_array_equal(ep.observations, original["obs"])
    np.testing.assert_array_equal(ep.actions, original["actions"])
    np.testing.assert_array_equal(ep.rewards, original["rewards"])
    np.testing.assert_array_equal(ep.terminations, original["terminated"])
    np.testing.assert_array_equal(ep.truncations, original["truncated"])

    back = import_dataset("worldmodels/toy-v0", tmp_path / "back")
    assert json.loads(back.meta_path.read_text()) == json.loads(store.meta_path.read_text())
    assert back.indices() == [0, 2, 5]
    for i in store.indices():
        a, b = store.load(i), back.load(i)
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_stages_train_on_a_minari_dataset_as_on_the_store(tmp_path, datasets):
    """train-vae and encode on store=minari:<id> give the V and latents of the store itself."""
    store_of(tmp_path / "toy" / "store", indices=range(4), steps=20, raw=False)
    common = ["progress=false", "threads=1", f"runs_dir={tmp_path}"]
    assert wm(["export-minari", *common, "run_name=toy", "dataset_id=cars/toy-v1"]) == 0
    tiny = ["epochs=1", "z_dim=4", "widths=[8, 16]", "batch_size=16", "heldout_fraction=0.25"]
    for name, store in [("from_store", tmp_path / "toy" / "store"), ("from_minari", "")]:
        source = f"store={store}" if store else "store=minari:cars/toy-v1"
        assert wm(["train-vae", *common, f"run_name={name}", source, *tiny]) == 0
        assert wm(["encode", *common, f"run_name={name}", source]) == 0
    a = load_checkpoint(tmp_path / "from_store" / "vae").model
    b = load_checkpoint(tmp_path / "from_minari" / "vae").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (
        LatentStore(tmp_path / "from_store" / "latents"),
        LatentStore(tmp_path / "from_minari" / "latents"),
    )
    assert la.indices() == lb.indices() == [0, 1, 2, 3]
    for i in la.indices():
        x, y = la.load(i), lb.load(i)
        for key in ("mu", "actions", "rewards", "terminated"):
            np.testing.assert_array_equal(x[key], y[key])
    # A dataset folder works as well as its id.
    assert MinariStore.open(str(datasets / "cars" / "toy-v1")).indices() == [0, 1, 2, 3]


def test_a_foreign_minari_dataset_reads_as_a_store(tmp_path, datasets):
    """A dataset made with Minari alone: RGB frames and float actions are enough."""
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    buf = EpisodeBuffer(
        observations=frames,
        actions=rng.normal(size=(5, 2)).astype(np.float32),
        rewards=np.ones(5),
        terminations=np.arange(5) == 4,
        truncations=np.zeros(5, bool),
    )
    minari.create_dataset_from_buffers(
        "other/frames-v0",
        [buf],
        observation_space=gym.spaces.Box(0, 255, (8, 8, 3), np.uint8),
        action_space=gym.spaces.Box(-1, 1, (2,), np.float32),
        jpeg_encoding=False,
    )
    store = MinariStore.open("other/frames-v0")
    info = store.info()
    assert info["frame_shape"] == [8, 8, 3] and info["action_dim"] == 2
    assert info["env_id"] == "unknown"
    ep = store.load(0)
    np.testing.assert_array_equal(ep["obs"], frames)
    assert ep["rewards"].tolist() == [1.0] * 5 and store.length(0) == 5
    batches = list(store.iter_frames(4, shuffle=False))
    assert [len(b) for b in batches] == [4, 2]


def test_minari_mistakes_are_one_line(tmp_path, datasets, capsys, monkeypatch):
    store_of(tmp_path / "toy" / "store", raw=False)
    common = [f"runs_dir={tmp_path}", "run_name=toy", "progress=false"]
    assert wm(["export-minari", *common, "dataset_id=no version"]) == 2
    assert "dataset_id: expected (namespace/)name-vN" in one_error_line(capsys, "export-minari")
    assert wm(["export-minari", *common]) == 0
    assert wm(["export-minari", *common]) == 2  # never over an existing dataset
    assert "already there" in one_error_line(capsys, "export-minari")
    assert wm(["train-vae", *common, "store=minari:worldmodels/absent-v0"]) == 2
    line = one_error_line(capsys, "train-vae")
    assert "no Minari dataset" in line and "MINARI_DATASETS_PATH" in line
    assert wm(["collect", *common, "store=minari:worldmodels/toy-v0", "backend=inline"]) == 2
    assert "Minari dataset, read only" in one_error_line(capsys, "collect")
    monkeypatch.setitem(sys.modules, "minari", None)  # as if the extra were not installed
    assert wm(["export-minari", *common, "dataset_id=worldmodels/again-v0"]) == 2
    assert 'pip install -e ".[minari]"' in one_error_line(capsys, "export-minari")
    assert not (datasets / "worldmodels" / "again-v0").exists()
