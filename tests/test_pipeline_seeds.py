"""benchmarks/pipeline_seeds.py on tiny settings: one seed end to end, its JSON and pictures."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from test_end_to_end import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_seeds_writes_the_seed_report(tmp_path):
    cfg = tiny_config(tmp_path)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "pipeline_seeds.py"),
        "--seeds",
        "3",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--search-per-generation",
        "3",
        f"runs_dir={tmp_path / 'runs'}",
        "fidelity.tracks=2",
        "fidelity.horizon=12",
        "fidelity.start_step=4",
        "fidelity.dream_samples=2",
        "fidelity.workers=1",
        "fidelity.horizons=[1,3]",
        "fidelity.context=3",
        "fidelity.policies=[stop,full_gas]",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last == json.loads((out / "seeds.json").read_text())
    (row,) = last["seeds"]
    assert row["seed"] == 3 and last["worst_seed_mean"] == row["controller_mean"]
    # 4 episodes of 60 steps, then 2 generations' checks of the mean on 1 track of 30 steps.
    assert row["real_env_steps"] == 4 * 60 + 2 * 1 * 30
    assert row["evaluation_env_steps"] == 3 * 2 * 30  # controller, full gas, random
    assert -1 <= row["within_generation_spearman"] <= 1  # 3 candidates in each generation
    assert Path(row["controller"]).is_dir()
    for png in ("track_scores.png", "kept_mean.png", "candidates.png"):
        assert Image.open(out / "seed3" / png).size == (
            640,
            400 if png != "candidates.png" else 480,
        )
