import numpy as np
import pytest
import torch

from gen_core.checkpoint import load_checkpoint, save_checkpoint
from gen_core.errors import UserError
from worldmodels.controller import BatchController, ControllerSpec, controller_obs
from worldmodels.evolve import ESSettings, evolve, load_search_history


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


TARGET = np.linspace(-1, 1, 6)


def quadratic_returns(candidates, generation):
    return -((candidates - TARGET) ** 2).sum(axis=1)  # best return 0 at TARGET


def settings(generations):
    return ESSettings(population=10, sigma0=0.5, generations=generations, eval_every=5, seed=3)


def test_cma_es_loop_climbs_a_quadratic(tmp_path):
    result = evolve(
        6,
        quadratic_returns,
        settings(40),
        tmp_path,
        {},
        show_progress=False,
        eval_fn=lambda p: (float(quadratic_returns(p[None], 0)[0]), 0.0),
    )
    first, last = result.history["best"][0], result.history["best"][-1]
    assert first < -1.0 and last > -1e-3, (first, last)
    np.testing.assert_allclose(result.best_params, TARGET, atol=0.05)
    assert result.history["eval_gen"] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_resume_after_a_kill_gives_the_same_run(tmp_path):
    straight = evolve(6, quadratic_returns, settings(12), tmp_path / "a", {}, show_progress=False)

    calls = {"n": 0}

    def killed_at_gen_7(candidates, generation):
        if generation == 7:
            raise KeyboardInterrupt  # the job is killed during generation 8
        calls["n"] += 1
        return quadratic_returns(candidates, generation)

    with pytest.raises(KeyboardInterrupt):
        evolve(6, killed_at_gen_7, settings(12), tmp_path / "b", {}, show_progress=False)
    assert load_checkpoint(tmp_path / "b").step == 7
    resumed = evolve(6, quadratic_returns, settings(12), tmp_path / "b", {}, show_progress=False)
    assert resumed.generations == straight.generations == 12
    np.testing.assert_array_equal(resumed.best_params, straight.best_params)
    np.testing.assert_array_equal(resumed.mean_params, straight.mean_params)
    assert resumed.history["best"] == straight.history["best"]


def test_search_history_gives_every_candidate_and_its_return(tmp_path):
    seen = []

    def recorded(candidates, generation):
        seen.append((candidates.copy(), quadratic_returns(candidates, generation)))
        return seen[-1][1]

    evolve(6, recorded, settings(3), tmp_path / "es", {}, show_progress=False)
    candidates, returns, config = load_search_history(tmp_path / "es")
    assert len(candidates) == len(returns) == 3 and config["n_params"] == 6
    for (x, r), got_x, got_r in zip(seen, candidates, returns):
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_allclose(got_r, r)  # returns, not cma's fitness = -return
    save_checkpoint(tmp_path / "other", 1, {"w": torch.zeros(2)}, {}, {})
    with pytest.raises(UserError, match="not an evolve checkpoint"):
        load_search_history(tmp_path / "other")
