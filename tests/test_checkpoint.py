import random

import numpy as np
import pytest
import torch

from gen_core.checkpoint import (
    check_compatible,
    checkpoint_config,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.errors import UserError
from gen_core.io import atomic_path, atomic_write_text


def test_save_load_round_trip_and_latest_pointer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3, 4):
        save_checkpoint(
            tmp_path,
            step,
            model.state_dict(),
            {"optim": opt.state_dict(), "rng": rng_state(), "epoch": step},
            {"z_dim": 8},
            keep=2,
        )
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    ck = load_checkpoint(tmp_path)
    assert ck.step == 4 and ck.state["epoch"] == 4 and ck.config == {"z_dim": 8}
    # The config alone, found the same way (checkpoint folder or its run stage), no weights read.
    assert checkpoint_config(tmp_path) == checkpoint_config(ck.path) == {"z_dim": 8}
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(ck.model)
    x = torch.randn(5, 3)
    assert torch.equal(clone(x), model(x))
    opt2 = torch.optim.Adam(clone.parameters())
    opt2.load_state_dict(ck.state["optim"])


def test_rng_state_restores_every_generator():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_missing_and_corrupt_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no checkpoint found"):
        checkpoint_config(tmp_path)
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, {})
    (tmp_path / "step_00000001" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable or corrupt"):
        load_checkpoint(tmp_path)


def test_half_written_step_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, {})
    (tmp_path / ".step_00000002.tmp").mkdir()  # a save killed part-way
    assert load_checkpoint(tmp_path).step == 1


def test_check_compatible_names_the_key(tmp_path):
    check_compatible({"model": {"z": 32}}, {"model": {"z": 32}}, ["model.z"], tmp_path)
    with pytest.raises(UserError, match="model.z is 32 in the checkpoint but 16"):
        check_compatible({"model": {"z": 32}}, {"model": {"z": 16}}, ["model.z"], tmp_path)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
