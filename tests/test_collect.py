import numpy as np
import pytest
import yaml

from gen_core.config import from_dict
from rollouts.collect import CollectConfig
from rollouts.recording import collect, episode_seeds
from rollouts.store import EpisodeStore
from worldmodels.cli import main as wm

STEPS = 40


def cfg(tmp_path, name, **kw):
    base = dict(
        runs_dir=str(tmp_path),
        run_name=name,
        episodes=3,
        max_steps=STEPS,
        backend="inline",
        progress=False,
        seed=5,
    )
    return from_dict(CollectConfig, {**base, **kw})


def test_inline_collection_writes_a_valid_store(tmp_path):
    c = cfg(tmp_path, "a")
    stats = collect(c)
    assert stats.episodes == 3 and stats.frames == 3 * (STEPS + 1)
    assert 0 < stats.bytes_per_frame < 64 * 64 * 3 / 4  # compressed at least 4x
    store = EpisodeStore(c.store_path())
    assert store.indices() == [0, 1, 2]
    ep = store.load(0)
    assert ep["obs"].shape == (STEPS + 1, 64, 64, 3) and ep["obs"].dtype == np.uint8
    assert ep["actions"].shape == (STEPS, 3)
    assert ep["actions"][:, 0].min() >= -1 and ep["actions"][:, 1:].min() >= 0
    assert ep["actions"].max() <= 1
    assert int(ep["seed"]) == episode_seeds(5, 0)[0]
    assert str(ep["policy"]) == "correlated"
    assert ep["truncated"][-1] and not ep["truncated"][:-1].any()
    # The road is grey and the grass green: frames are real renders, not blank.
    assert ep["obs"][-1].std() > 10
    saved = yaml.safe_load((tmp_path / "a" / "collect" / "config.yaml").read_text())
    assert saved["episodes"] == 3 and saved["max_steps"] == STEPS


def test_resume_after_interruption_gives_the_same_store(tmp_path):
    full = cfg(tmp_path, "full", episodes=4)
    collect(full)
    part = cfg(tmp_path, "part", episodes=2)
    collect(part)  # "killed" after two episodes ...
    store = EpisodeStore(part.store_path())
    store.episode_path(1).unlink()  # ... and one episode never reached the disk
    (store.episode_dir / ".ep_000001.npz.x.tmp.npz").write_bytes(b"half-written")
    collect(cfg(tmp_path, "part", episodes=4))  # run again: finishes what is missing
    ref = EpisodeStore(full.store_path())
    assert store.indices() == ref.indices() == [0, 1, 2, 3]
    for i in range(4):
        a, b = store.load(i), ref.load(i)
        for k in ("obs", "actions", "rewards"):
            np.testing.assert_array_equal(a[k], b[k])


def test_policies_and_frame_settings(tmp_path):
    c = cfg(
        tmp_path,
        "c",
        episodes=1,
        policy="constant",
        policy_params={"action": [0, 1, 0]},
        frame_size=32,
        crop_bottom=12,
        keep_raw=True,
    )
    collect(c)
    ep = EpisodeStore(c.store_path()).load(0)
    assert ep["obs"].shape[1:] == (32, 32, 3) and ep["raw_obs"].shape[1:] == (96, 96, 3)
    np.testing.assert_array_equal(ep["actions"], np.tile([0, 1, 0], (STEPS, 1)))
    # Re-collecting into the same store with another frame size is refused in one line.
    assert (
        wm(
            [
                "collect",
                f"runs_dir={tmp_path}",
                "run_name=c",
                "backend=inline",
                "frame_size=64",
                "episodes=2",
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("policy=wobbly", "policy: expected one of"),
        ("policy_params={hold_mean: 0}", "hold_mean"),
        ("env_id=NoSuchEnv-v0", "env_id: cannot make"),
    ],
)
def test_bad_collection_settings_exit_2(tmp_path, override, fragment, capsys):
    assert wm(["collect", f"runs_dir={tmp_path}", "backend=inline", override]) == 2
    assert fragment in capsys.readouterr().err


def test_ray_workers_give_the_same_episodes_as_inline(tmp_path):
    inline = cfg(tmp_path, "inline", episodes=3)
    collect(inline)
    ray_cfg = cfg(tmp_path, "ray", episodes=3, backend="ray", workers=2)
    collect(ray_cfg)
    a, b = EpisodeStore(inline.store_path()), EpisodeStore(ray_cfg.store_path())
    assert a.indices() == b.indices()
    for i in a.indices():
        np.testing.assert_array_equal(a.load(i)["obs"], b.load(i)["obs"])
