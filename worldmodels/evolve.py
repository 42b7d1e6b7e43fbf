"""CMA-ES with the `cma` package, as a visible ask/tell loop that checkpoints every generation.

`cma` minimises, so the loop tells it `fitness = -return`. A killed run resumes exactly: the
checkpoint holds every generation's candidates and fitness plus the RNG states, and resuming
rebuilds the strategy from the same seed and replays ask/tell over that history (no fitness is
recomputed), then restores the RNG states. Nothing is unpickled: the history is plain arrays.

The same loop trains the car's controller (in the real env or in the dream) and the tests'
quadratic, so what the tests check is what the car uses.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gen_core.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.errors import UserError
from gen_core.runs import Run, progress

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cma warns that matplotlib is missing; plots are ours
    import cma


@dataclass
class ESSettings:
    """What the loop needs from a config."""

    population: int
    sigma0: float
    generations: int
    eval_every: int  # score the mean with `eval_fn` every this many generations (0: never)
    seed: int
    x0: np.ndarray | None = None  # start point (default zeros)


@dataclass
class ESResult:
    best_params: np.ndarray  # best candidate seen (by its fitness return)
    best_return: float
    mean_params: np.ndarray
    generations: int
    scored_params: np.ndarray | None  # mean parameters with the best `eval_fn` score so far
    scored_return: float
    history: dict[str, list] = field(default_factory=dict)  # per generation curves


def _make_es(n_params: int, s: ESSettings) -> cma.CMAEvolutionStrategy:
    x0 = np.zeros(n_params) if s.x0 is None else np.asarray(s.x0, dtype=float)
    opts = {"popsize": s.population, "seed": s.seed + 1, "verbose": -9}  # seed 0 means "random"
    return cma.CMAEvolutionStrategy(x0, s.sigma0, opts)


def evolve(
    n_params: int,
    fitness_returns: Callable[[np.ndarray, int], np.ndarray],
    settings: ESSettings,
    ckpt_dir: Path,
    config: dict,
    run: Run | None = None,
    eval_fn: Callable[[np.ndarray], tuple[float, float]] | None = None,
    shape_keys: list[str] | None = None,
    show_progress: bool = True,
) -> ESResult:
    """Maximise the return that `fitness_returns(candidates (P, n), generation) -> (P,)` gives.

    `eval_fn(params) -> (mean, std)` scores the current mean on more trials every
    `settings.eval_every` generations. Checkpoints go to `ckpt_dir` every generation.
    """
    es = _make_es(n_params, settings)
    config = config | {"n_params": n_params}
    hist_x: list[np.ndarray] = []
    hist_f: list[np.ndarray] = []
    curves: dict[str, list] = {"best": [], "mean": [], "worst": [], "eval_gen": [], "eval": []}
    best_params, best_return = np.zeros(n_params), -np.inf
    scored_params, scored_return = None, -np.inf
    start = 0
    if latest_checkpoint(ckpt_dir) is not None:
        ck = load_checkpoint(ckpt_dir)
        check_compatible(ck.config, config, (shape_keys or []) + ["n_params"], ck.path)
        hist_x = [x.numpy() for x in ck.model["candidates"]]
        hist_f = [f.numpy() for f in ck.model["fitness"]]
        for x, f in zip(hist_x, hist_f):
            es.ask()
            es.tell(list(x), list(f))
        set_rng_state(ck.state["rng"])
        curves = ck.state["curves"]
        best_params = ck.model["best_params"].numpy()
        best_return = float(ck.state["best_return"])
        if "scored_params" in ck.model:
            scored_params = ck.model["scored_params"].numpy()
            scored_return = float(ck.state["scored_return"])
        start = ck.step
        if run is not None:
            run.log.info(f"evolve: resumed from {ck.path} (generation {start})")
    bar = progress(
        range(start, settings.generations), desc="cma-es", unit="gen", disable=not show_progress
    )
    for gen in bar:
        t0 = time.perf_counter()
        candidates = np.asarray(es.ask())  # (P, n)
        returns = np.asarray(fitness_returns(candidates, gen), dtype=float)  # (P,)
        fitness = -returns  # cma minimises
        es.tell(list(candidates), fitness.tolist())
        hist_x.append(candidates)
        hist_f.append(fitness)
        i = int(np.argmax(returns))
        if returns[i] > best_return:
            best_return, best_params = float(returns[i]), candidates[i].copy()
        curves["best"].append(float(returns.max()))
        curves["mean"].append(float(returns.mean()))
        curves["worst"].append(float(returns.min()))
        line = (
            f"gen {gen + 1}/{settings.generations}: return best {returns.max():.2f} "
            f"mean {returns.mean():.2f} worst {returns.min():.2f}, sigma {es.sigma:.3f}, "
            f"{time.perf_counter() - t0:.1f}s"
        )
        if eval_fn is not None and settings.eval_every and (gen + 1) % settings.eval_every == 0:
            m, sd = eval_fn(np.asarray(es.mean))
            if m > scored_return:
                scored_params, scored_return = np.asarray(es.mean).copy(), float(m)
            curves["eval_gen"].append(gen + 1)
            curves["eval"].append(float(m))
            line += f"; mean params scored {m:.2f} +- {sd:.2f}"
        if run is not None:
            run.log.info(line)
            run.scalars(
                gen + 1,
                return_best=returns.max(),
                return_mean=returns.mean(),
                return_worst=returns.min(),
                sigma=es.sigma,
            )
            if curves["eval_gen"] and curves["eval_gen"][-1] == gen + 1:
                run.scalars(gen + 1, return_of_mean_params=curves["eval"][-1])
        bar.set_postfix(best=f"{returns.max():.1f}", mean=f"{returns.mean():.1f}")
        arrays = {
            "candidates": [torch.from_numpy(x) for x in hist_x],
            "fitness": [torch.from_numpy(f) for f in hist_f],
            "best_params": torch.from_numpy(best_params),
            "mean_params": torch.from_numpy(np.asarray(es.mean)),
        }
        if scored_params is not None:
            arrays["scored_params"] = torch.from_numpy(scored_params)
        save_checkpoint(
            ckpt_dir,
            gen + 1,
            arrays,
            {
                "rng": rng_state(),
                "curves": curves,
                "best_return": best_return,
                "scored_return": scored_return,
            },
            config,
            keep=2,  # each checkpoint holds the whole history; two are enough to survive a kill
        )
    bar.close()
    return ESResult(
        best_params,
        best_return,
        np.asarray(es.mean),
        settings.generations,
        scored_params,
        scored_return,
        curves,
    )


def load_controller_params(path: Path, which: str = "auto") -> tuple[np.ndarray, dict]:
    """Controller parameters from an evolve checkpoint, and the config that made them.

    which: "scored" (mean parameters with the best evaluation score), "mean" (the final
    CMA-ES mean), "best" (the best single candidate, a noisy pick), or "auto" (scored if any
    evaluation ran, else mean).
    """
    ck = load_checkpoint(path)
    if which == "auto":
        which = "scored" if "scored_params" in ck.model else "mean"
    key = f"{which}_params"
    if key not in ck.model:
        raise UserError(f"{ck.path}: no {which} parameters (no evaluation ran); use params=mean")
    return ck.model[key].double().numpy(), ck.config


def load_search_history(path: Path) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Every generation's candidates (P, n) and the returns they were selected by (P,), from an
    evolve checkpoint (the history a resume replays), and the config that made them."""
    ck = load_checkpoint(path)
    if "candidates" not in ck.model:
        raise UserError(f"{ck.path}: not an evolve checkpoint (no candidate history)")
    candidates = [x.double().numpy() for x in ck.model["candidates"]]
    returns = [-f.double().numpy() for f in ck.model["fitness"]]  # fitness = -return
    return candidates, returns, ck.config
