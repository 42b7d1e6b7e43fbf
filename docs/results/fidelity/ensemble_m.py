"""`wm fidelity` with a dream stepped by an ensemble of Ms: the measurement behind "An ensemble
that takes turns" (README.md here).

Each member keeps its own memory and reads the same dreamed frame and action. At every step
each rollout's next z, reward and end come from one member drawn at random (`--pick step`:
PETS's TS1 trajectory sampling, Chua et al. 2018, "Deep Reinforcement Learning in a Handful of
Trials using Probabilistic Dynamics Models"), so a dream follows no single member's errors for
long; `--pick rollout` keeps one member per rollout throughout (TS-infinity).

    python docs/results/fidelity/ensemble_m.py --members runs/const/mdnrnn_L500/checkpoints \\
        runs/const/mdnrnn_L500s1/checkpoints runs/const/mdnrnn_L500s2/checkpoints -- \\
        fidelity --config configs/carracing_small.yaml run_name=const \\
        mdnrnn=runs/const/mdnrnn_L500/checkpoints name=ens_L500 strip=[]

(`mdnrnn=` names the M whose held-out episodes the open-loop diagnostics use.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from types import SimpleNamespace

import torch

import worldmodels.agent as agent
import worldmodels.fidelity as fidelity
from worldmodels.cli import main as wm
from worldmodels.dream import DreamStep, dream_step
from worldmodels.mdnrnn import load_mdnrnn


def ensemble_step(models, temperature: float, threshold: float, per_rollout: bool):
    """One dream step of K members; h and c hold the members' states side by side (B, K * H)."""
    K, H = len(models), models[0].config.hidden

    @torch.no_grad()
    def step(z, h, c, action, generator):
        outs = [
            dream_step(
                m,
                z,
                h[:, k * H : (k + 1) * H],
                c[:, k * H : (k + 1) * H],
                action,
                temperature,
                generator,
                threshold,
            )
            for k, m in enumerate(models)
        ]
        B = z.shape[0]
        if per_rollout:
            pick = torch.arange(B) % K  # (B,) the same member every step
        else:
            pick = torch.randint(K, (B,), generator=generator)  # (B,) a member per step
        rows = torch.arange(B)
        return DreamStep(
            torch.stack([o.z for o in outs])[pick, rows],  # (B, z_dim)
            torch.cat([o.h for o in outs], dim=1),  # (B, K * H)
            torch.cat([o.c for o in outs], dim=1),
            torch.stack([o.reward for o in outs])[pick, rows],  # (B,)
            torch.stack([o.done for o in outs])[pick, rows],
        )

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", nargs="+", required=True, help="M checkpoints")
    ap.add_argument("--pick", choices=["step", "rollout"], default="step")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    models = [load_mdnrnn(p)[0].eval() for p in args.members]
    if len({(m.config.hidden, m.config.z_dim) for m in models}) != 1:
        raise SystemExit("members: every M needs the same hidden and z_dim")
    per_rollout = args.pick == "rollout"
    fidelity.mdnrnn_step = lambda _m, tau, threshold=0.5: ensemble_step(
        models, tau, threshold, per_rollout
    )
    load_parts = agent.load_agent_parts

    def parts_with_wide_memory(*a, **kw):
        vae, m, spec, frames = load_parts(*a, **kw)
        config = replace(m.config, hidden=len(models) * m.config.hidden)
        return vae, SimpleNamespace(config=config), spec, frames

    agent.load_agent_parts = parts_with_wide_memory  # fixed policies only: no agent is built
    sys.exit(wm(argv[cut + 1 :]))


if __name__ == "__main__":
    main()
