"""Dream fidelity on the small CarRacing config: does the dream rank policies as the real env does,
and does the controller evolved in it drive?

Needs a finished run of the small pipeline (`wm pipeline --config configs/carracing_small.yaml`,
~1 h on 2 cores; this script measures, it does not train). Through the toolkit's own commands:

1. `wm fidelity` (worldmodels.fidelity.main): nine fixed policies (stop, gas 0.2 / 0.5 / 1.0,
   steer left / right, brake, uniform random, correlated random) plus the run's controller, each
   driving `--horizon` steps from the same `--tracks` real starts (after a 50-step standing
   warm-up), in the dream and in the real env: Spearman rank correlation of the mean returns,
   dream and real "stop" and "full gas", and how often "stop", "gas 0.5" and "full gas" end the
   episode within the horizon in the dream and for real (a dream that misses or invents
   CarRacing's leave-the-playfield ends gets those returns wrong).
2. `wm evaluate` (worldmodels.evaluate.main): the controller, constant full gas and uniform random
   actions over the same `--episodes` real tracks of 1,000 steps: mean and std of each.

With `--search`, step 1 also ranks 8 of the controller's own CMA-ES candidates (the best, two
middle and the worst of its middle and last generations, by the dream return CMA-ES selected
them by) in the dream and for real: the ranking evolution relies on, which tells dreams that
evolve a driver from dreams that do not where the fixed policies cannot (experiments/fidelity).

Last line: one JSON object. Real returns of the fixed policies are cached under runs/, so a second
run costs only the dream side and the evaluation.

    python benchmarks/dream_fidelity.py [--config configs/carracing_small.yaml] [--episodes 20]
                                        [--search] [run_name=<run>]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gen_core.config import load_config
from worldmodels.evaluate import EvaluateConfig
from worldmodels.evaluate import main as evaluate
from worldmodels.evolve import load_search_history
from worldmodels.fidelity import FidelityConfig
from worldmodels.fidelity import main as fidelity
from worldmodels.layout import RunLayout
from worldmodels.stages import SECTIONS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/carracing_small.yaml")
    p.add_argument("--episodes", type=int, default=20, help="real tracks per scored policy")
    p.add_argument("--tracks", type=int, default=16, help="fidelity tracks (dream start states)")
    p.add_argument("--horizon", type=int, default=300)
    p.add_argument(
        "--controller", default="", help="controller checkpoint (default: the run's last round)"
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="also rank 8 of the controller's CMA-ES candidates (4 from its middle and 4 from its "
        "last generation) in the dream and the real env: ~3 more minutes",
    )
    p.add_argument("overrides", nargs="*", help="key=value settings shared by both stages")
    args = p.parse_args()
    t0 = time.perf_counter()

    fcfg = load_config(
        FidelityConfig,
        args.config,
        [*args.overrides, f"tracks={args.tracks}", f"horizon={args.horizon}", "name=benchmark"],
        "fidelity",
        SECTIONS,
    )
    # The last round of the iterative loop, if any.
    layout = RunLayout.of(fcfg)
    controller = Path(args.controller or layout.controller_checkpoints(layout.last_round()))
    m = layout.m_checkpoints(layout.last_round())
    if not controller.exists():
        raise SystemExit(f"{controller} not found: run the pipeline first")
    fcfg.controllers = [str(controller)]
    if args.search:
        generations = len(load_search_history(controller)[1])
        fcfg.search = str(controller)
        fcfg.search_generations = sorted({max(1, generations // 2), generations})
        fcfg.search_per_generation = 4
    fcfg.m = fcfg.m or str(m)
    fidelity(fcfg)
    fid = json.loads((layout.fidelity / "benchmark" / "fidelity.json").read_text())

    scores = {}
    for name, extra in [
        ("controller", [f"controller={controller}", f"m={fcfg.m}"]),
        ("full_gas", ["policy=constant", "policy_params={action: [0, 1, 0]}"]),
        ("random", ["policy=uniform"]),
    ]:
        ecfg = load_config(
            EvaluateConfig,
            args.config,
            [
                *args.overrides,
                f"episodes={args.episodes}",
                "gif=false",
                f"name=bench_{name}",
                *extra,
            ],
            "evaluate",
            SECTIONS,
        )
        evaluate(ecfg)
        scores[name] = json.loads(RunLayout.of(ecfg).score(f"bench_{name}").read_text())

    out = {
        "name": "dream_fidelity",
        "spearman": fid["spearman"],
        "spearman_90": fid.get("spearman_90"),  # bootstrap interval over tracks
        "pearson": fid["pearson"],
        "policies": fid["policies"],
        "fidelity_tracks": args.tracks,
        "horizon": args.horizon,
        "temperature": fid["temperature"],
        "dream_stop": fid["dream_stop"],
        "dream_full_gas": fid["dream_full_gas"],
        "real_stop": fid["real_stop"],
        "real_full_gas": fid["real_full_gas"],
        # End rates within the horizon; absent from a fidelity.json written before they were.
        **{
            key: fid[key]
            for side in ("dream", "real")
            for policy in ("stop", "gas_0.5", "full_gas")
            if (key := f"{side}_end_{policy}") in fid
        },
        # With --search: Spearman against the real env of the candidates' returns in this
        # dream, of the returns CMA-ES selected them by, and of the latter within a generation.
        **{f"search_{k}": v for k, v in fid.get("search", {}).items()},
        "dream_controller": fid["dream_controller_1"],
        "real_controller_300_steps": fid["real_controller_1"],
        "controller_real_mean": round(scores["controller"]["mean"], 2),
        "controller_real_std": round(scores["controller"]["std"], 2),
        "full_gas_real_mean": round(scores["full_gas"]["mean"], 2),
        "full_gas_real_std": round(scores["full_gas"]["std"], 2),
        "random_real_mean": round(scores["random"]["mean"], 2),
        "random_real_std": round(scores["random"]["std"], 2),
        "episodes": args.episodes,
        "controller_vs_full_gas": round(
            scores["controller"]["mean"] - scores["full_gas"]["mean"], 2
        ),
        "run": str(fcfg.run_dir),
        "controller": str(controller),
        "wall_s": round(time.perf_counter() - t0, 1),
        "units": "returns (sum of env rewards); fidelity over `horizon` steps, scores over 1000",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
