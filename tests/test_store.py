import tracemalloc

import numpy as np
import pytest

from gen_core.errors import UserError
from rollouts.store import (
    CorruptEpisodeError,
    EpisodeStore,
    StoreInfo,
    encode_episode,
)
from worldmodels.cli import main as wm

INFO = StoreInfo(frame_shape=(16, 16, 3), env_id="Toy-v0", action_dim=3)


def fake_episode(rng, steps, size=16):
    return {
        "obs": rng.integers(0, 256, (steps + 1, size, size, 3), dtype=np.uint8),
        "actions": rng.normal(size=(steps, 3)).astype(np.float32),
        "rewards": rng.normal(size=steps).astype(np.float32),
        "terminated": np.arange(steps) == steps - 1,
        "truncated": np.zeros(steps, bool),
        "seed": np.asarray(123, np.int64),
        "policy": np.asarray("uniform"),
    }


def make_store(path, n, steps=10, seed=0):
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path, INFO)
    eps = [fake_episode(rng, steps + i) for i in range(n)]
    for i, ep in enumerate(eps):
        store.write_episode(i, encode_episode(ep))
    return store, eps


def test_round_trip_and_metadata(tmp_path):
    store, eps = make_store(tmp_path / "s", 3)
    assert store.indices() == [0, 1, 2] and len(store) == 3
    for i, ep in enumerate(eps):
        back = store.load(i)
        for k, v in ep.items():
            np.testing.assert_array_equal(back[k], v)
        assert store.length(i) == len(ep["actions"])
    assert str(store.load(0, ("policy",))["policy"]) == "uniform"
    assert store.info()["frame_shape"] == [16, 16, 3]


def test_sequence_and_frame_access_cover_every_frame(tmp_path):
    store, eps = make_store(tmp_path / "s", 5)
    seqs = dict(store.iter_episodes(keys=("obs", "actions")))
    assert sorted(seqs) == [0, 1, 2, 3, 4]
    all_frames = np.concatenate([e["obs"] for e in eps])
    batches = list(store.iter_frames(batch_size=7, shuffle=True, seed=1, buffer_episodes=2))
    assert all(len(b) == 7 for b in batches[:-1])
    got = np.concatenate(batches)
    assert len(got) == len(all_frames)

    # Same multiset of frames: compare the sorted raw bytes of each frame.
    def key(frames):
        return sorted(f.tobytes() for f in frames)

    assert key(got) == key(all_frames)
    # Shuffled: not in store order; reproducible for a seed.
    assert not np.array_equal(got, all_frames)
    again = np.concatenate(list(store.iter_frames(7, shuffle=True, seed=1, buffer_episodes=2)))
    np.testing.assert_array_equal(got, again)


def test_reading_memory_stays_flat_as_store_grows(tmp_path):
    def peak_bytes(n):
        store, _ = make_store(tmp_path / f"s{n}", n, steps=200, seed=n)
        tracemalloc.start()
        for _ in store.iter_frames(batch_size=32, buffer_episodes=2, seed=0):
            pass
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak

    small, large = peak_bytes(4), peak_bytes(16)
    one_episode = 201 * 16 * 16 * 3
    assert large < small * 1.5, (small, large)
    assert large < 12 * one_episode, (large, one_episode)


def test_creating_with_other_settings_is_refused(tmp_path):
    make_store(tmp_path / "s", 1)
    other = StoreInfo(frame_shape=(64, 64, 3), env_id="Toy-v0", action_dim=3)
    with pytest.raises(UserError, match="frame_shape"):
        EpisodeStore.create(tmp_path / "s", other)


def test_temporary_files_are_not_episodes(tmp_path):
    store, _ = make_store(tmp_path / "s", 2)
    (store.episode_dir / ".ep_000002.npz.abc.tmp.npz").write_bytes(b"half")
    assert store.indices() == [0, 1]


def test_corrupt_and_truncated_files_are_named(tmp_path, capsys):
    store, _ = make_store(tmp_path / "s", 3)
    p1 = store.episode_path(1)
    p1.write_bytes(p1.read_bytes()[: p1.stat().st_size // 2])  # truncated
    p2 = store.episode_path(2)
    data = bytearray(p2.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)  # bit rot inside compressed frames
    p2.write_bytes(bytes(data))
    with pytest.raises(CorruptEpisodeError, match="ep_000001.npz"):
        store.load(1)
    with pytest.raises(CorruptEpisodeError, match="ep_000002.npz"):
        store.load(2)
    bad = {p.name for p, _ in store.check()}
    assert bad == {"ep_000001.npz", "ep_000002.npz"}
    # wm check-data lists them and fails; --delete_bad removes them so collect can redo them.
    assert wm(["check-data", f"store={store.path}"]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "ep_000001.npz" in out and "ep_000002.npz" in out
    assert wm(["check-data", f"store={store.path}", "delete_bad=true"]) == 1
    assert store.indices() == [0]
    assert wm(["check-data", f"store={store.path}"]) == 0


def test_inconsistent_episode_is_rejected():
    rng = np.random.default_rng(0)
    ep = fake_episode(rng, 5)
    ep["obs"] = ep["obs"][:-1]
    with pytest.raises(CorruptEpisodeError, match="observations for 5 actions"):
        encode_episode(ep)


def test_not_a_store(tmp_path, capsys):
    assert wm(["check-data", f"store={tmp_path}"]) == 2
    assert "not an episode store (no store.json)" in capsys.readouterr().err
