"""`wm pack-agent` and `wm play` (issue 27): a run's V, M and C in one small fp16 folder, and a
GIF of the real env, V's view and M's dream side by side, from it or from the shipped agent."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_run import make_tiny_run

from worldmodels.agent import load_driver
from worldmodels.cli import main as wm
from worldmodels.layout import RunLayout
from worldmodels.models import SHIPPED_AGENT, load_packed_agent


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = make_tiny_run(root)
    out = root / "agent"
    assert wm(["pack-agent", f"run={run}", f"out={out}", "note=a toy"]) == 0
    return run, out


def test_pack_stores_fp16_and_loads_back_float32(packed):
    run, out = packed
    weights = torch.load(out / "agent.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in weights["vae"].values())
    assert all(v.dtype == torch.float16 for v in weights["m"].values() if v.is_floating_point())
    layout = RunLayout(run)
    (vae, m, spec, frames), params = load_driver(
        layout.controller_checkpoints(),
        layout.vae_checkpoints,
        layout.m_checkpoints(),
        layout.store,
    )
    v2, m2, params2, spec2, record = load_packed_agent(out)
    for a, b in ((vae, v2), (m, m2)):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert y.dtype == x.dtype == torch.float32, k
            torch.testing.assert_close(y, x.half().float(), rtol=0, atol=0)
    np.testing.assert_array_equal(params2, params.astype(np.float32))  # C as the agent runs it
    assert spec2 == spec and record["models"]["frames"] == {"size": 16, "crop_bottom": 0}
    made = record["made"]
    assert made["run"] == str(run) and made["seed"] == 0 and made["note"] == "a toy"
    assert made["scores"] == "none recorded (run wm evaluate)"


def test_play_writes_real_view_and_dream_side_by_side(packed, tmp_path):
    _, agent = packed
    gif = tmp_path / "p.gif"
    args = [f"runs_dir={tmp_path}", "progress=false", f"agent={agent}", f"out={gif}"]
    assert wm(["play", *args, "steps=24", "every=2", "scale=1", "dream_every=5"]) == 0
    img = Image.open(gif)
    assert img.n_frames == 12 and img.size == (96 * 3 + 4, 96)
    img.seek(0)
    first = np.asarray(img.convert("RGB"))
    # V's view and the dream are framed green and red; the dream starts from V's view.
    assert tuple(first[50, 98]) == (0, 200, 0) and tuple(first[50, 196]) == (220, 0, 0)
    np.testing.assert_array_equal(first[2:-2, 100:192], first[2:-2, 198:290])
    assert Image.open(tmp_path / "p.png").size == (96 * 3 + 4, 96)


def test_the_shipped_agent_loads_and_plays(tmp_path):
    record = yaml.safe_load((SHIPPED_AGENT / "agent.yaml").read_text())
    # The shipped agent is a driver: its recorded 100-track score stands well clear of both
    # baselines (the standard error of a 100-track mean is std / 10).
    scores = record["made"]["scores"]
    assert scores["episodes"] == 100
    floor = max(scores["random_mean"], scores["full_gas_mean"])
    assert scores["controller_mean"] - 3 * scores["controller_std"] / 10 > floor + 300
    assert (SHIPPED_AGENT / "agent.pt").stat().st_size < 12 * 2**20
    vae, m, params, spec, _ = load_packed_agent()
    assert vae.config.image_size == 64 and spec.n_params == len(params) == 867
    assert all(p.dtype == torch.float32 for p in [*vae.parameters(), *m.parameters()])
    gif = tmp_path / "shipped.gif"
    assert wm(["play", f"runs_dir={tmp_path}", "progress=false", "steps=6", f"out={gif}"]) == 0
    assert Image.open(gif).n_frames == 3
