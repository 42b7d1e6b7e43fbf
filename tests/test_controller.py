import pytest
import torch

from worldmodels.controller import BatchController, ControllerSpec, controller_obs


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
