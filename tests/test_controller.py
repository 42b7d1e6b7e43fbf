import dataclasses

import numpy as np
import pytest
import torch
import yaml

from gen_core.errors import UserError
from worldmodels.controller import BatchController, ControllerSpec, controller_obs
from worldmodels.evolve import ESSettings, evolve, load_controller_params
from worldmodels.models import check_controller_spec, controller_model_spec, load_controller


def test_default_controller_has_the_paper_size_and_action_ranges():
    spec = ControllerSpec()
    assert spec.n_params == 867  # (32 + 256) * 3 + 3, as in World Models
    params = torch.randn(5, spec.n_params) * 10  # large weights: outputs saturate
    ctrl = BatchController(params, spec)
    a = ctrl(torch.randn(5, 100, spec.in_dim) * 10)
    assert a.shape == (5, 100, 3)
    assert a[..., 0].min() >= -1 and a[..., 0].max() <= 1
    assert a[..., 1:].min() >= 0 and a[..., 1:].max() <= 1
    # Saturation reaches the ends of each range, so full gas and no brake are expressible.
    assert a[..., 1].max() > 0.99 and (a[..., 2] == 0).any()


def test_batched_population_equals_one_at_a_time():
    spec = ControllerSpec(z_dim=4, hidden=6)
    params = torch.randn(3, spec.n_params)
    z, h = torch.randn(3, 7, 4), torch.randn(3, 7, 6)
    batched = BatchController(params, spec)(controller_obs(z, h, spec))
    for p in range(3):
        single = BatchController(params[p], spec)(controller_obs(z[p : p + 1], h[p : p + 1], spec))
        assert torch.allclose(single[0], batched[p], atol=1e-6)


def test_z_only_variant():
    spec = ControllerSpec(z_dim=32, hidden=0)
    assert spec.n_params == 32 * 3 + 3
    obs = controller_obs(torch.randn(2, 5, 32), torch.randn(2, 5, 256), spec)
    assert obs.shape == (2, 5, 32)


def test_wrong_parameter_count_is_refused():
    with pytest.raises(ValueError, match="expected 867 parameters"):
        BatchController(torch.zeros(10), ControllerSpec())


# ---------------------------------------------------------------- C saved and loaded by its spec


def _evolved(ckpt_dir, spec, model_spec="spec", eval_every=1):
    """A two-generation search over `spec`'s parameters, its spec saved as model.yaml."""
    target = np.linspace(-1, 1, spec.n_params)
    settings = ESSettings(population=4, sigma0=0.3, generations=2, eval_every=eval_every, seed=0)
    return evolve(
        spec.n_params,
        lambda c, g: -((c - target) ** 2).sum(axis=1),
        settings,
        ckpt_dir,
        {"observe_hidden": spec.hidden > 0},
        eval_fn=lambda p: (float(-((p - target) ** 2).sum()), 0.0),
        show_progress=False,
        model_spec=controller_model_spec(spec) if model_spec == "spec" else model_spec,
    )


def test_load_controller_reads_its_spec_from_model_yaml(tmp_path):
    spec = ControllerSpec(z_dim=3, hidden=2, action_dim=2, squash="tanh")
    result = _evolved(tmp_path / "c" / "checkpoints", spec)
    saved = yaml.safe_load(
        (tmp_path / "c" / "checkpoints" / "step_00000002" / "model.yaml").read_text()
    )
    assert saved == {"class": "LinearController", "config": dataclasses.asdict(spec)}
    picks = {"mean": result.mean_params, "best": result.best_params, "scored": result.scored_params}
    for which, expected in [*picks.items(), ("auto", result.scored_params)]:
        params, loaded, config = load_controller(tmp_path / "c", which)  # a stage folder too
        assert loaded == spec and config["observe_hidden"] and config["n_params"] == spec.n_params
        np.testing.assert_array_equal(params, expected)
        old_params, _ = load_controller_params(tmp_path / "c" / "checkpoints", which)
        np.testing.assert_array_equal(params, old_params)  # the old reader still works
    BatchController(params, loaded)  # what the agent builds from them


def test_load_controller_refuses_what_is_not_c(tmp_path):
    spec = ControllerSpec(z_dim=3, hidden=0, action_dim=2)
    _evolved(tmp_path / "bare", spec, model_spec=None, eval_every=0)
    with pytest.raises(
        UserError, match=r"bare/step_00000002: not a controller .*model.yaml is miss"
    ):
        load_controller(tmp_path / "bare")
    _evolved(tmp_path / "other", spec, model_spec={"class": "VAE", "config": {}}, eval_every=0)
    with pytest.raises(UserError, match="not a controller checkpoint .*holds a VAE"):
        load_controller(tmp_path / "other")
    wrong = {"class": "LinearController", "config": {"z_dim": 3, "hidden": 5, "action_dim": 2}}
    _evolved(tmp_path / "wrong", spec, model_spec=wrong, eval_every=0)
    with pytest.raises(UserError, match="8 controller parameters, but its model.yaml describes 18"):
        load_controller(tmp_path / "wrong")
    unknown = {"class": "LinearController", "config": {"z_dim": 3, "depth": 2}}
    _evolved(tmp_path / "unknown", spec, model_spec=unknown, eval_every=0)
    with pytest.raises(UserError, match="'depth', which ControllerSpec does not know"):
        load_controller(tmp_path / "unknown")
    _evolved(tmp_path / "unscored", spec, eval_every=0)
    with pytest.raises(UserError, match="no scored parameters"):
        load_controller(tmp_path / "unscored", "scored")


def test_check_controller_spec_against_v_and_m():
    agent = ControllerSpec(z_dim=4, hidden=6, action_dim=3)
    check_controller_spec(ControllerSpec(z_dim=4, hidden=6, action_dim=3), agent, "c")
    check_controller_spec(ControllerSpec(z_dim=4, hidden=0, action_dim=3), agent, "c")  # z only
    for bad in ({"z_dim": 8}, {"hidden": 5}, {"action_dim": 2}):
        loaded = dataclasses.replace(agent, **bad)
        with pytest.raises(UserError, match="^ctrl/x: the controller reads .* V and M give") as err:
            check_controller_spec(loaded, agent, "ctrl/x")
        assert "\n" not in str(err.value)
