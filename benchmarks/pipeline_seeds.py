"""The quick start at several seeds: does the recipe evolve a driver in the dream on every seed?

LONG: runs the whole small pipeline once per seed (`wm pipeline --config
configs/carracing_small.yaml seed=S`, each seed changing data, V, M and C): about 46 min per
seed on 2 cores, so ~2.3 h for the default three seeds. Finished stages are skipped, so a killed run
continues where it stopped. Then, per seed, `wm fidelity` on the run's controller and its CMA-ES
candidates (`search_per_generation` candidates from each of four generations, ranked in the dream
and on real tracks).

Writes `<out>/seeds.json` (default docs/results/carracing_small/seeds.json):
{"seeds": [...], "mean_of_means", "worst_seed_mean", "spread"}, each seed {seed,
controller_mean, controller_std, full_gas_mean, random_mean, real_env_steps (collection + every
real check of the CMA-ES mean, of every draw of C, and the tracks the draws were compared on;
the 100-track evaluation apart, as evaluation_env_steps),
wall_time_s (this invocation: stages already done on disk cost ~0), logged_stage_seconds (each
stage's time over every invocation of the run, from its pipeline log),
within_generation_spearman, controller (the checkpoint path)}; and per seed, in
`<out>/seed<S>/`: the histogram of the 100 track scores, the real score of the CMA-ES mean against
generation, and the candidate-ranking plot (dream vs real return of CMA-ES's own candidates).

    python benchmarks/pipeline_seeds.py [--seeds 0 1 2] [--config FILE] [--out DIR]
                                        [--search-per-generation 8] [key=value ...]

Extra `key=value` settings go to every `wm pipeline` (e.g. `m.kind=transformer`). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from datetime import datetime
from pathlib import Path

from gen_core.checkpoint import checkpoint_config
from gen_core.config import load_config
from gen_core.io import atomic_write_text
from gen_core.plots import histogram_chart, line_chart, read_scalars
from rollouts.store import EpisodeStore
from worldmodels.cli import main as wm
from worldmodels.layout import TB, RunLayout
from worldmodels.pipeline import PipelineConfig, pick_name


def logged_stage_seconds(log: Path) -> dict[str, float]:
    """Seconds each pipeline stage took, summed over every invocation the run's pipeline log
    holds (a stage's time runs from its line to the next; a stage whose invocation was killed
    has no end and is left out). A stage that found its work done counts ~0 s."""
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) pipeline: (stage (\S+)|report)")
    marks = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if m := stamp.match(line):
            marks.append((datetime.fromisoformat(m[1]), m[3]))  # stage name, None: the report
    seconds: dict[str, float] = {}
    for (t0, name), (t1, nxt) in zip(marks, marks[1:]):
        if name is None or nxt == "collect":  # a report, or the next invocation's start
            continue
        seconds[name] = seconds.get(name, 0.0) + (t1 - t0).total_seconds()
    return seconds


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One seed: the pipeline, then fidelity of its controller and candidates; its figures."""
    run_name = f"{args.prefix}{seed}"
    common = ["--config", args.config, f"seed={seed}", f"run_name={run_name}", *args.overrides]
    t0 = time.perf_counter()
    if wm(["pipeline", *common]) != 0:
        raise SystemExit(f"seed {seed}: wm pipeline failed")
    wall = time.perf_counter() - t0
    cfg = load_config(PipelineConfig, args.config, common[2:])
    layout = RunLayout.of(cfg)
    k = cfg.iterations
    ckpt = layout.controller_checkpoints(k)
    fidelity_name = "seeds"
    # fidelity reads the same file; of the extra settings the shared ones, the dream's and its
    # own section's concern it
    mine = [
        o.removeprefix("fidelity.")
        for o in args.overrides
        if "." not in o.split("=")[0] or o.startswith(("dream.", "fidelity."))
    ]
    fidelity = [
        "fidelity",
        *common[:4],
        *mine,
        f"m={layout.m_checkpoints(k)}",
        f"controllers=[{ckpt}]",
        f"search={ckpt}",
        f"search_per_generation={args.search_per_generation}",
        f"name={fidelity_name}",
        "strip=[]",
    ]
    if wm(fidelity) != 0:
        raise SystemExit(f"seed {seed}: wm fidelity failed")
    fid = json.loads((layout.fidelity / fidelity_name / "fidelity.json").read_text())
    scores = {
        n: json.loads(layout.score(n).read_text()) for n in ("controller", "full_gas", "random")
    }

    # Real env steps spent on the recipe: every stored frame transition (collection, and the
    # iterative loop's agent episodes), plus every real check of the CMA-ES mean.
    store = EpisodeStore(layout.store)
    collected = sum(int(ep["length"]) for _, ep in store.iter_episodes(keys=("length",)))
    # With controller_draws, every draw's checks count, and so do the tracks the draws' kept
    # means were compared on.
    draws = [(r, j) for r in range(k + 1) for j in range(cfg.controller_draws)]
    c_cfgs = [checkpoint_config(layout.controller_checkpoints(r, j)) for r, j in draws]
    curves = [read_scalars(layout.controller(r, j) / TB) for r, j in draws]
    checks = sum(
        len(c.get("controller/return_of_mean_params", ([], []))[0]) * cc["eval_trials"]
        * cc["max_steps"]
        for c, cc in zip(curves, c_cfgs)
    )  # fmt: skip
    pick_scores = [layout.score(pick_name(layout, r, j)) for r, j in draws]
    picks = sum(
        (p := json.loads(f.read_text()))["episodes"] * p["max_steps"]
        for f in pick_scores
        if cfg.controller_draws > 1 and f.exists()
    )
    evaluation = sum(s["episodes"] * s["max_steps"] for s in scores.values())

    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    returns = scores["controller"]["returns"]
    histogram_chart(
        folder / "track_scores.png",
        returns,
        title=f"seed {seed}: controller on {len(returns)} real tracks, mean "
        f"{statistics.mean(returns):.1f}",
        xlabel="return over 1,000 steps",
    )
    kept = read_scalars(layout.controller(k) / TB)  # the kept draw's
    gens, real = kept.get("controller/return_of_mean_params", ([], []))
    dream_gens, dream_mean = kept.get("controller/return_mean", ([], []))
    line_chart(
        folder / "kept_mean.png",
        {
            "CMA-ES mean, real tracks": (gens, real),
            "population mean, dream": (dream_gens, dream_mean),
        },
        title=f"seed {seed}: real score of the CMA-ES mean (kept: the best) and dream return",
        xlabel="generation",
        ylabel="return",
    )
    search_png = layout.fidelity / fidelity_name / "search.png"
    if search_png.exists():
        shutil.copy(search_png, folder / "candidates.png")
    controller_row = next(r for r in fid["table"] if r["policy"].startswith("controller"))
    return {
        "seed": seed,
        "controller_mean": round(scores["controller"]["mean"], 1),
        "controller_std": round(scores["controller"]["std"], 1),
        "full_gas_mean": round(scores["full_gas"]["mean"], 1),
        "random_mean": round(scores["random"]["mean"], 1),
        "real_env_steps": collected + checks + picks,
        "evaluation_env_steps": evaluation,
        "wall_time_s": round(wall, 1),
        "logged_stage_seconds": logged_stage_seconds(layout.pipeline / "log.txt"),
        "within_generation_spearman": fid.get("search", {}).get("within_generation"),
        "candidates_spearman": fid.get("search", {}).get("spearman"),
        "fixed_policy_spearman": fid.get("spearman"),
        "controller_dream_return": controller_row["dream_mean"],
        "controller_real_return": controller_row["real_mean"],
        "controller": str(ckpt),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default="configs/carracing_small.yaml")
    p.add_argument("--out", default="docs/results/carracing_small")
    p.add_argument("--prefix", default="seed", help="run_name is <prefix><seed>")
    p.add_argument("--search-per-generation", type=int, default=8)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    out = Path(args.out)
    rows = [run_seed(args, s, out) for s in args.seeds]
    means = [r["controller_mean"] for r in rows]
    result = {
        "name": "pipeline_seeds",
        "config": args.config,
        "overrides": args.overrides,
        "seeds": rows,
        "mean_of_means": round(statistics.mean(means), 1),
        "worst_seed_mean": min(means),
        "spread": [min(means), max(means)],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "seeds.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
