import random

import numpy as np
import pytest
import torch
import yaml

from gen_core.checkpoint import (
    MODELS,
    build_model,
    check_compatible,
    checkpoint_config,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    model_spec,
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


# ------------------------------------------------------------------ model.yaml: every model class


def _mdn(model):
    return model(torch.randn(2, 5, 3), torch.randn(2, 5, 2)).mu


# class name -> (tiny config, outputs of the model for fixed inputs)
TINY_MODELS = {
    "VAE": (
        {"image_size": 16, "z_dim": 4, "widths": (8, 16)},
        lambda m: m.decode(m.encode(torch.rand(2, 3, 16, 16))[0]),
    ),
    "MDNRNN": ({"z_dim": 3, "action_dim": 2, "hidden": 8, "n_mixtures": 2}, _mdn),
    "MDNTransformer": (
        {"z_dim": 3, "action_dim": 2, "n_embd": 32, "n_layer": 1, "head_size": 16, "window": 4},
        _mdn,
    ),
    "Transformer": (
        {"block_size": 8, "vocab_size": 11, "n_layer": 1, "n_head": 2, "n_embd": 16},
        lambda m: m(torch.randint(0, 11, (2, 8)))[0],
    ),
    "GAN": (
        {"image_size": 8, "z_dim": 4, "g_width": 4, "d_width": 4, "loss": "wgan-gp"},
        lambda m: m.discriminator(m.generator(torch.randn(2, 4))),
    ),
    "Diffusion": (
        {"image_size": 8, "width": 8, "mults": (1, 2), "attn_resolutions": (4,), "timesteps": 10},
        lambda m: m.ema(torch.randn(2, 3, 8, 8), torch.tensor([0, 9])),
    ),
    "LatentDiffusion": (
        {"z_dim": 4, "width": 8, "depth": 1, "timesteps": 10},
        lambda m: m.to_output(m.ema(torch.randn(2, 4), torch.tensor([0, 9]))),
    ),
    "FeatureNet": (
        {"image_size": 16, "widths": (4, 8, 8), "code_dim": 8},
        lambda m: m(torch.rand(2, 3, 16, 16)),
    ),
}


def test_every_registered_model_has_a_round_trip_case():
    assert set(TINY_MODELS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_yaml_rebuilds_each_registered_model(tmp_path, name):
    config, outputs = TINY_MODELS[name]
    torch.manual_seed(0)
    model = build_model({"class": name, "config": config})
    assert type(model).__name__ == name
    with torch.no_grad():  # away from any zero initialisation, so equal outputs mean something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    spec = model_spec(model)
    assert spec["class"] == name
    path = save_checkpoint(tmp_path, 7, model.state_dict(), {}, {"run": 1}, model_spec=spec)
    # plain YAML, readable without this package
    assert yaml.safe_load((path / "model.yaml").read_text()) == spec
    torch.manual_seed(1)  # the rebuilt model starts from other weights
    loaded, ck = load_model(tmp_path, kinds=(name,))
    assert type(loaded) is type(model) and not loaded.training
    assert ck.step == 7 and ck.config == {"run": 1} and ck.model_spec == spec
    assert loaded.config == model.config  # tuples come back as tuples
    model.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        expected = outputs(model)
        torch.manual_seed(2)
        torch.testing.assert_close(outputs(loaded), expected, rtol=0, atol=0)


def test_model_yaml_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(ValueError, match="Linear: not a model a checkpoint can rebuild"):
        model_spec(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="unknown model class 'Linear'"):
        build_model({"class": "Linear", "config": {}})
    with pytest.raises(UserError, match="'depth', which GANConfig does not know"):
        build_model({"class": "GAN", "config": {"depth": 3}})
    save_checkpoint(tmp_path / "bare", 1, {"w": torch.ones(2)}, {}, {})
    with pytest.raises(UserError, match="bare.*no model.yaml"):
        load_model(tmp_path / "bare")
    gan = build_model({"class": "GAN", "config": TINY_MODELS["GAN"][0]})
    save_checkpoint(tmp_path / "gan", 1, gan.state_dict(), {}, {}, model_spec=model_spec(gan))
    with pytest.raises(UserError, match="gan.*holds a GAN, expected VAE"):
        load_model(tmp_path / "gan", kinds=("VAE",))
