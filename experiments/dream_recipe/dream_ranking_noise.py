"""How repeatable is the dream's ranking of one CMA-ES generation's candidates?

For generations 1, 6, 10 and 15 of a finished run, the 64 candidates CMA-ES compared are scored
again in the dream (train-controller's own `DreamFitness`: `trials` dreams each, start states
shared by all candidates) with two other draws of starts and M's samples, and ranked:
- "independent": the whole population in one batch, as train-controller does (each candidate's
  dreams draw their own samples);
- "common": each candidate alone from the same generator, so every candidate meets the same
  starts and the same random numbers (common random numbers).
Spearman between the two draws is how far the dream's ranking within a generation repeats.

    python experiments/dream_recipe/dream_ranking_noise.py RUN_DIR
"""

import sys
from pathlib import Path

import numpy as np
import torch

from gen_core.config import load_config
from worldmodels.agent import load_agent_parts
from worldmodels.dream import DreamStarts
from worldmodels.evolve import load_search_history
from worldmodels.latents import dream_episodes
from worldmodels.layout import RunLayout
from worldmodels.train_controller import DreamFitness, TrainControllerConfig


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def main(run: Path) -> None:
    torch.set_num_threads(1)
    layout = RunLayout(run)
    cfg = load_config(TrainControllerConfig, layout.controller() / "config.yaml")
    _, m, spec, _ = load_agent_parts(
        layout.vae_checkpoints, layout.m_checkpoints(), layout.store, cfg.observe_hidden
    )
    stepper = m.stepper()
    episodes = dream_episodes(layout.latents)
    starts = DreamStarts.from_episodes(
        stepper, episodes, cfg.start_states, cfg.dream.warmup, cfg.max_start, cfg.seed
    )
    fit = DreamFitness(stepper, starts, spec, cfg, "cpu")
    candidates, returns, _ = load_search_history(layout.controller_checkpoints())
    for g in (1, 6, 10, 15):
        cands, recorded = candidates[g - 1], returns[g - 1]
        a, b = fit(cands, 1000 + g), fit(cands, 2000 + g)  # two other draws of the dream
        ca = np.array([fit(c[None], 1000 + g)[0] for c in cands])
        cb = np.array([fit(c[None], 2000 + g)[0] for c in cands])
        print(
            f"generation {g}: independent {spearman(a, b):.3f} (recorded vs redrawn "
            f"{spearman(recorded, a):.3f}), common {spearman(ca, cb):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
