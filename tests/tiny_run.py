"""A whole tiny run made in seconds, for tests of what reads a finished run (the SB3 example,
`wm play`'s assets): a 16x16 store of CarRacingFast-v3's action size, V, latents, M and C, each
trained for a moment through `wm`. The frames are toy squares, so the models are bad, but every
file is where and what a pipeline run leaves."""

from pathlib import Path

import numpy as np
from test_vae import squares

from rollouts.store import EpisodeStore, StoreInfo
from worldmodels.cli import main as wm


def make_tiny_run(root: Path, name: str = "tiny", episodes: int = 4, steps: int = 40) -> Path:
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(
        root / name / "store", StoreInfo((16, 16, 3), "CarRacingFast-v3", 3)
    )
    for i in range(episodes):
        store.write_episode(
            i,
            {
                "obs": squares(rng, steps + 1),
                "actions": rng.uniform([-1, 0, 0], [1, 1, 1], (steps, 3)).astype(np.float32),
                "rewards": rng.normal(size=steps).astype(np.float32),
                "terminated": np.zeros(steps, bool),
                "truncated": np.arange(steps) == steps - 1,
            },
        )
    common = [f"runs_dir={root}", f"run_name={name}", "progress=false", "threads=1", "seed=0"]
    assert wm(["train-vae", *common, "epochs=1", "z_dim=4", "widths=[8, 16]", "batch_size=16"]) == 0
    assert wm(["encode", *common]) == 0
    assert wm(["train-m", *common, "epochs=1", "hidden=8", "seq_len=10", "batch_size=4"]) == 0
    controller = ["mode=dream", "population=4", "trials=2", "generations=1", "dream_steps=10",
                  "start_states=8", "eval_every=0", "dream.warmup=3"]  # fmt: skip
    assert wm(["train-controller", *common, *controller]) == 0
    return root / name
