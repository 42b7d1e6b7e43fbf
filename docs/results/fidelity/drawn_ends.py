"""`wm fidelity` with dream ends drawn from M's end probability instead of a threshold: the
measurement behind "Ends drawn from M's end probability" (README.md here).

M's done head is trained with ends weighted `done_pos_weight` times, which multiplies the odds it
predicts by that weight; the odds are divided back before each step's end is drawn
(`--uncorrected` draws the head's probability as it is).

    python docs/results/fidelity/drawn_ends.py -- fidelity --config configs/carracing_small.yaml \\
        run_name=const mdnrnn=runs/const/mdnrnn_L500/checkpoints name=drawn_L500 strip=[]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

import torch

import worldmodels.fidelity as fidelity
from worldmodels.cli import main as wm
from worldmodels.dream import dream_step


def drawn_end_step(model, temperature: float, pos_weight: float):
    """M's dream step with each rollout's end drawn at its (odds / pos_weight) probability."""
    odds_shift = math.log(pos_weight)

    @torch.no_grad()
    def step(z, h, c, action, generator):
        # A threshold above 1 never fires: the toolkit's step without its end and its payment.
        s = dream_step(model, z, h, c, action, temperature, generator, done_threshold=2.0)
        p_end = torch.sigmoid(model.done(s.h).squeeze(-1) - odds_shift)  # (B,) M's done head
        done = torch.rand(p_end.shape, generator=generator) < p_end
        return replace(s, reward=s.reward + model.config.done_reward * done, done=done)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pos-weight", type=float, default=10.0, help="M's done_pos_weight")
    ap.add_argument("--uncorrected", action="store_true", help="draw the head's probability")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    weight = 1.0 if args.uncorrected else args.pos_weight
    fidelity.mdnrnn_step = lambda model, tau, threshold=0.5: drawn_end_step(model, tau, weight)
    sys.exit(wm(argv[cut + 1 :]))


if __name__ == "__main__":
    main()
