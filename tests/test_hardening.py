"""Bad input ends in one line, `wm <cmd>: error: ...`, naming the setting or file and what to do,
and exit status 2 (or simply works). One test per probe of issue 25's hardening list."""

import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_vae import squares, tiny_overrides, toy_store

from gen_core.config import ConfigError, load_config
from gen_core.errors import UserError
from gen_core.runs import RunConfig, resolve_device, start_run
from rollouts.store import CorruptEpisodeError, EpisodeStore, StoreInfo
from worldmodels.cli import main as wm
from worldmodels.stages import PIPELINE_SETTINGS, SECTIONS, SHARED_SECTIONS
from worldmodels.train_vae import TrainVAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a refused command (its log lines aside)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert err and err[-1].startswith(f"wm {command}: error: "), err
    assert not any(line.startswith("Traceback") for line in err), err
    return err[-1]


def store_of(path, size: int = 16, episodes: int = 2, steps: int = 10, action_dim: int = 3):
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(path, StoreInfo((size, size, 3), "Toy-v0", action_dim))
    for i in range(episodes):
        store.write_episode(i, episode(rng, steps, size, action_dim))
    return store


def episode(rng, steps: int, size: int = 16, action_dim: int = 3) -> dict:
    return {
        "obs": squares(rng, steps + 1, size),
        "actions": rng.uniform(0, 1, (steps, action_dim)).astype(np.float32),
        "rewards": np.zeros(steps, np.float32),
        "terminated": np.zeros(steps, bool),
        "truncated": np.zeros(steps, bool),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with a 16x16 store and a tiny V trained on it (one epoch)."""
    root = tmp_path_factory.mktemp("runs")
    toy_store(root / "toy" / "store", episodes=3, steps=20)
    args = ["train-vae", *tiny_overrides(root), "epochs=1"]
    assert wm(args) == 0
    return root, args


# ---------------------------------------------------------------------------------------------
# 1. a V checkpoint whose frame size is not the store's


def test_encode_refuses_a_store_of_other_frames(trained, tmp_path, capsys):
    root, _ = trained
    store_of(tmp_path / "big", size=32)
    vae = root / "toy" / "vae"
    args = [f"runs_dir={tmp_path}", f"vae={vae}", f"store={tmp_path / 'big'}", "progress=false"]
    assert wm(["encode", *args]) == 2
    line = one_error_line(capsys, "encode")
    assert "V reads 16x16x3 frames but the store" in line and "holds 32x32x3" in line


def test_controller_stages_refuse_a_store_of_other_frames(trained, tmp_path, capsys):
    from worldmodels.agent import load_agent_parts

    root, _ = trained
    store_of(tmp_path / "big", size=32)
    vae = root / "toy" / "vae"
    args = [
        f"runs_dir={tmp_path}",
        f"vae={vae}",
        f"m={tmp_path / 'no_m'}",
        f"store={tmp_path / 'big'}",
        "progress=false",
    ]
    assert wm(["train-controller", *args]) == 2
    assert "holds 32x32x3" in one_error_line(capsys, "train-controller")
    # evaluate and collect-agent load V, M and the store through the same function
    with pytest.raises(UserError, match="V reads 16x16x3 frames"):
        load_agent_parts(vae, tmp_path / "no_m", tmp_path / "big")


# ---------------------------------------------------------------------------------------------
# 2. devices


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:-1", "gpu"])
def test_malformed_devices_are_config_errors(device, capsys):
    assert wm(["check-data", f"device={device}"]) == 2
    assert "device: expected auto, cpu, cuda, cuda:N" in one_error_line(capsys, "check-data")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_an_apple_gpu_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no MPS device"):
        resolve_device("mps")
    toy_store(tmp_path / "toy" / "store", episodes=2)
    assert wm(["train-vae", f"runs_dir={tmp_path}", "run_name=toy", "device=mps"]) == 2
    assert "device: mps asked for, but no MPS device" in one_error_line(capsys, "train-vae")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_index_without_cuda_is_one_line():
    with pytest.raises(ConfigError, match="cuda:7 asked for, but no CUDA device"):
        resolve_device("cuda:7")


# ---------------------------------------------------------------------------------------------
# 3. misspelt top-level keys of a pipeline file


@pytest.mark.parametrize(
    "text, key, hint",
    [
        ("seed: 1\nvea: {epochs: 3}\ncollect: {episodes: 2}\n", "vea", "did you mean vae?"),
        ("seeed: 5\nvae: {epochs: 3}\n", "seeed", "did you mean seed?"),
        ("vae: {epochs: 3}\nitérations: 2\n", "itérations", "did you mean iterations?"),
    ],
)
def test_single_stage_refuses_unknown_top_level_keys(tmp_path, capsys, text, key, hint):
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(text)
    for command in ("train-vae", "collect", "check-data"):
        assert wm([command, "--config", str(cfg), f"runs_dir={tmp_path}"]) == 2
        line = one_error_line(capsys, command)
        assert f"{cfg}: {key}: unknown top-level key" in line and hint in line, line
    assert not (tmp_path / "default").exists()  # refused before anything ran


def test_a_pipeline_file_still_serves_every_single_stage(tmp_path):
    # shared sections, the pipeline's own settings and other stages' sections are skipped
    path = os.path.join(REPO, "configs", "carracing_small.yaml")
    cfg = load_config(
        TrainVAEConfig,
        path,
        ["epochs=2"],
        section="vae",
        other_sections=tuple(s for s in SECTIONS if s != "vae"),
        ignored=SHARED_SECTIONS + PIPELINE_SETTINGS,
    )
    assert cfg.epochs == 2 and cfg.run_name == "carracing_small"
    toy_store(tmp_path / "carracing_small" / "store", episodes=2)
    # wm check-data (no section of its own) read the small config's `dream:` as a mistake
    assert wm(["check-data", "--config", path, f"runs_dir={tmp_path}"]) == 0


def test_pipeline_settings_list_matches_the_pipeline_config():
    from worldmodels.pipeline import PipelineConfig

    own = {f.name for f in dataclasses.fields(PipelineConfig)}
    own -= {f.name for f in dataclasses.fields(RunConfig)} | set(SECTIONS) | set(SHARED_SECTIONS)
    assert own == set(PIPELINE_SETTINGS)


# ---------------------------------------------------------------------------------------------
# 4. policy parameters of the wrong type


@pytest.mark.parametrize(
    "params, fragment",
    [
        ("{action: abc}", "policy_params.action: expected a list of 3 numbers, got 'abc'"),
        ("{action: [a, b, c]}", "policy_params.action: expected a list of 3 numbers"),
        ("{hold_mean: abc}", "policy_params:"),
    ],
)
def test_mistyped_policy_params_are_one_line(tmp_path, capsys, params, fragment):
    policy = "correlated" if "hold_mean" in params else "constant"
    args = ["collect", f"runs_dir={tmp_path}", f"policy={policy}", f"policy_params={params}"]
    assert wm([*args, "backend=inline", "episodes=1", "max_steps=5", "progress=false"]) == 2
    assert fragment in one_error_line(capsys, "collect")


# ---------------------------------------------------------------------------------------------
# 5. folders that cannot be written


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("runs_dir=/dev/null", "runs_dir: cannot write the run folder /dev/null/default/collect"),
        ("runs_dir=/proc/x", "runs_dir: cannot write the run folder /proc/x/default/collect"),
        ("store=/dev/null", "store: cannot write the episode store /dev/null"),
    ],
)
def test_unwritable_folders_are_named(tmp_path, capsys, setting, fragment):
    args = ["collect", setting, "backend=inline", "episodes=1", "max_steps=5", "progress=false"]
    if not setting.startswith("runs_dir"):
        args.append(f"runs_dir={tmp_path}")
    assert wm(args) == 2
    line = one_error_line(capsys, "collect")
    assert fragment in line and "writable folder" in line


# ---------------------------------------------------------------------------------------------
# 6, 7. bounds


@pytest.mark.parametrize(
    "command, setting, fragment",
    [
        ("check-data", f"seed={2**64}", "seed: expected a value <= 4294967295"),
        ("check-data", "seed=-1", "seed: expected a value >= 0"),
        ("collect", "frame_size=100000", "frame_size: expected a value <= 1024, got 100000"),
    ],
)
def test_out_of_range_settings(tmp_path, capsys, command, setting, fragment):
    assert wm([command, f"runs_dir={tmp_path}", setting]) == 2
    assert fragment in one_error_line(capsys, command)


def test_the_largest_seed_runs(tmp_path):
    run = start_run(RunConfig(runs_dir=str(tmp_path), seed=2**32 - 1), "x")
    run.close()


# ---------------------------------------------------------------------------------------------
# 8. store.json deleted, then a collection of other frames into the old folder


def test_collect_refuses_to_recreate_store_json_over_other_frames(tmp_path, capsys):
    store = toy_store(tmp_path / "s", episodes=2, steps=5)
    (store.path / "store.json").unlink()
    args = ["collect", f"runs_dir={tmp_path}", f"store={store.path}", "backend=inline"]
    args += ["episodes=2", "max_steps=5", "progress=false"]
    assert wm([*args, "frame_size=32"]) == 2
    line = one_error_line(capsys, "collect")
    assert "no store.json, and ep_000000.npz does not match this run" in line
    assert "obs is uint8 6x16x16x3, the store holds uint8 Tx32x32x3" in line
    assert not (store.path / "store.json").exists()
    # frames that match: store.json comes back, and the episodes on disk are kept
    assert wm([*args, "frame_size=16"]) == 0
    assert store.info()["frame_shape"] == [16, 16, 3] and store.indices() == [0, 1]


# ---------------------------------------------------------------------------------------------
# 9, 10. episode files that do not match their store


def bad_store(tmp_path, kind: str) -> EpisodeStore:
    store = toy_store(tmp_path / "toy" / "store", episodes=3, steps=20)
    ep = store.load(1)
    rng = np.random.default_rng(1)
    if kind == "no obs":
        del ep["obs"]
    elif kind == "small frames":
        ep["obs"] = squares(rng, len(ep["obs"]), 8)
    elif kind == "narrow actions":
        ep["actions"] = ep["actions"][:, :2]
    elif kind == "float frames":
        ep["obs"] = ep["obs"].astype(np.float32)
    np.savez_compressed(store.episode_path(1), **ep)
    return store


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("no obs", "missing arrays ['obs']"),
        ("small frames", "obs is uint8 21x8x8x3, the store holds uint8 Tx16x16x3"),
        ("narrow actions", "actions is float32 20x2, the store holds float Tx3"),
        ("float frames", "obs is float32 21x16x16x3, the store holds uint8"),
    ],
)
def test_check_data_names_files_that_do_not_match_the_store(tmp_path, capsys, kind, fragment):
    store = bad_store(tmp_path, kind)
    assert wm(["check-data", f"runs_dir={tmp_path}", "run_name=toy"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"BAD {store.episode_path(1)}: does not match its store")
    assert fragment in out[0] and out[-1].endswith("1 bad, 0.0 MiB")
    with pytest.raises(CorruptEpisodeError, match="ep_000001.npz: does not match its store"):
        store.load(1)


@pytest.mark.parametrize("kind", ["small frames", "narrow actions"])
def test_readers_name_the_bad_file(trained, tmp_path, capsys, kind):
    root, args = trained
    store = bad_store(tmp_path, kind)
    bad = str(store.episode_path(1))
    with pytest.raises(CorruptEpisodeError, match=bad):
        if kind == "small frames":
            list(store.iter_frames(batch_size=4, shuffle=False))
        else:
            list(store.iter_episodes(keys=("actions",)))
    if kind == "small frames":  # (V reads only the frames: other actions do not stop it)
        assert wm(["train-vae", *args[1:], f"runs_dir={tmp_path}"]) == 2
        assert bad in one_error_line(capsys, "train-vae")
    enc = ["encode", f"runs_dir={tmp_path}", "run_name=toy", f"vae={root / 'toy' / 'vae'}"]
    assert wm([*enc, "progress=false"]) == 2
    assert bad in one_error_line(capsys, "encode")


# ---------------------------------------------------------------------------------------------
# 12. two processes on one stage folder


def test_a_stage_folder_in_use_is_refused(tmp_path, capsys):
    cfg = RunConfig(runs_dir=str(tmp_path), run_name="x")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from gen_core.runs import RunConfig, start_run; "
            f"start_run(RunConfig(runs_dir={str(tmp_path)!r}, run_name='x'), 'vae', "
            "torch_needed=False); print('ready', flush=True); time.sleep(60)",
            "train-vae",
            "epochs=9",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(UserError) as err:
            start_run(cfg, "vae", torch_needed=False)
        assert str(err.value) == (
            f"{tmp_path / 'x' / 'vae'} is in use by pid {holder.pid} (-c train-vae epochs=9); "
            "wait for it or use another run_name"
        )
        toy_store(tmp_path / "x" / "store", episodes=2)
        assert wm(["train-vae", f"runs_dir={tmp_path}", "run_name=x"]) == 2
        assert f"is in use by pid {holder.pid}" in one_error_line(capsys, "train-vae")
        start_run(cfg, "m", torch_needed=False).close()  # another stage of the run is free
    finally:
        holder.kill()
        holder.wait()
    run = start_run(cfg, "vae", torch_needed=False)  # the lock went with its process
    # this process may start the folder again (the pipeline does), even before closing it
    again = start_run(cfg, "vae", torch_needed=False)
    run.close()
    again.close()
    with open(tmp_path / "x" / "vae" / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nothing holds it now


# ---------------------------------------------------------------------------------------------
# 13. a V checkpoint given as the controller


def test_evaluate_names_a_checkpoint_that_is_not_a_controller(trained, tmp_path, capsys):
    root, _ = trained
    vae = root / "toy" / "vae"
    args = ["evaluate", f"runs_dir={tmp_path}", f"controller={vae}", "params=mean"]
    assert wm([*args, "episodes=1", "progress=false"]) == 2
    line = one_error_line(capsys, "evaluate")
    assert "not a controller checkpoint" in line and "use params=mean" not in line


# ---------------------------------------------------------------------------------------------
# 14. resuming with settings that shape the job changed


@pytest.mark.parametrize(
    "change, fragment",
    [
        ("max_steps=6", "collected with max_steps=5, this run asks for 6"),
        ("policy=uniform", "collected with policy='correlated', this run asks for 'uniform'"),
        ("seed=3", "collected with seed=0, this run asks for 3"),
        ("frame_size=32", "existing store has frame_shape=[16, 16, 3]"),
    ],
)
def test_collect_refuses_to_add_episodes_made_otherwise(tmp_path, capsys, change, fragment):
    args = ["collect", f"runs_dir={tmp_path}", "backend=inline", "max_steps=5", "frame_size=16"]
    args += ["progress=false", "episodes=1"]
    assert wm(args) == 0
    assert wm([*args, "episodes=2", change]) == 2
    assert fragment in one_error_line(capsys, "collect")
    assert EpisodeStore(tmp_path / "default" / "store").indices() == [0]


def test_encode_refuses_latents_of_another_store(trained, tmp_path, capsys):
    root, _ = trained
    shutil.copytree(root / "toy" / "store", tmp_path / "a")
    shutil.copytree(root / "toy" / "store", tmp_path / "b")
    args = ["encode", f"runs_dir={tmp_path}", f"vae={root / 'toy' / 'vae'}", "progress=false"]
    assert wm([*args, f"store={tmp_path / 'a'}"]) == 0
    assert wm([*args, f"store={tmp_path / 'b'}"]) == 2
    line = one_error_line(capsys, "encode")
    assert f"holds the latents of the store {tmp_path / 'a'}" in line and "out=" in line


# ---------------------------------------------------------------------------------------------
# 15. a refused run leaves the folder's config.yaml as it was


def test_a_refused_resume_keeps_the_config_that_made_the_checkpoints(trained, tmp_path, capsys):
    root, args = trained
    shutil.copytree(root / "toy", tmp_path / "toy")
    config = tmp_path / "toy" / "vae" / "config.yaml"
    before = config.read_text()
    assert "z_dim: 4" in before
    assert wm([*args, f"runs_dir={tmp_path}", "z_dim=8", "epochs=2"]) == 2
    assert "z_dim" in one_error_line(capsys, "train-vae")
    assert config.read_text() == before
    # an accepted resume records the config it ran with
    assert wm([*args, f"runs_dir={tmp_path}", "epochs=2"]) == 0
    assert "epochs: 2" in config.read_text()


# ---------------------------------------------------------------------------------------------
# 16. help


def test_wm_gen_alone_prints_gens_help(capsys):
    assert wm(["gen"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: wm gen") and "train-text" in out


def test_collect_help_lists_every_policy(capsys):
    with pytest.raises(SystemExit):
        wm(["collect", "--help"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("policy="))
    assert all(name in line for name in ("uniform", "correlated", "explore", "constant"))
