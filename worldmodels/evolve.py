"""CMA-ES with the `cma` package, as a visible ask/tell loop that checkpoints every generation.

`cma` minimises, so the loop tells it `fitness = -return`. Each generation costs constant I/O,
however long the run:

- The checkpoint (`ckpt_dir/step_<gen>/`, the last two kept) holds CMA-ES's own state rather than
  the history that led to it: `cma_state` (worldmodels/cma_state.py) walks the `cma` object graph
  (mean, sigma, the sampler's C/B/D, evolution paths, counters, best solution, ...) into a flat
  dict keyed by attribute path, of tensors, numbers, strings and lists (no pickled objects; it
  loads with `torch.load(weights_only=True)`), plus the RNG states (`cma` draws from numpy's
  global RNG), and the best candidate and the best-scored mean with their returns. Its size
  depends on the population and the number of parameters, not on the generation: ~14 MB at
  64 x 867 parameters, mostly the covariance matrix and its eigenbasis (6 MB each). The ints
  in it (counters such as countevals, the Mersenne Twisters' states) are kept in int64 tensors,
  as pickled ints would take more bytes as the counters grow, so the checkpoint of a
  200-generation run is no larger than that of a 10-generation one.
- A resume builds a fresh strategy from the same x0, sigma0 and options, sets that state back
  with `restore_cma_state` and restores the RNG states, so a killed run goes on with
  bit-identical candidates. The population, sigma0, seed and x0 are kept in the checkpoint, and
  a resume with other ones is refused.
- Every generation's candidates and returns, which `wm fidelity search=...` reads through
  `load_search_history`, go to a file of their own, written once: `ckpt_dir/history/
  gen_<gen>.npz`. Before, each checkpoint held the whole history and a resume replayed it, so a
  2,000-generation run of 64 x 867 parameters rewrote up to ~0.9 GB every generation.
- So do the curves `evolve` returns (`ESResult.history`): that file also holds the generation's
  best, mean and worst return (`best`, `mean`, `worst`) and, where the mean parameters were
  scored that generation, the score and its std (`eval`, `eval_std`). A resume rebuilds the
  curves from the files of generations 1 to the checkpoint's, reading only those numbers.
  (54a6e29 kept the curves in the checkpoint, ~27 bytes more a generation; a run it wrote
  resumes, and its history files get their curves then.)

The same loop trains the car's controller (in the real env or in the dream) and the tests'
quadratic, so what the tests check is what the car uses.
"""

from __future__ import annotations

import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_core.checkpoint import (
    Checkpoint,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.errors import UserError
from gen_core.io import atomic_path
from gen_core.runs import Run, progress
from worldmodels.cma_state import cma_state, restore_cma_state, rng_from_tensors, rng_tensors

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cma warns that matplotlib is missing; plots are ours
    import cma

HISTORY = "history"  # folder of per-generation candidates and returns, inside the checkpoints


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


def _x0(n_params: int, s: ESSettings) -> np.ndarray:
    return np.zeros(n_params) if s.x0 is None else np.asarray(s.x0, dtype=float)


def _make_es(n_params: int, s: ESSettings) -> cma.CMAEvolutionStrategy:
    opts = {"popsize": s.population, "seed": s.seed + 1, "verbose": -9}  # seed 0 means "random"
    return cma.CMAEvolutionStrategy(_x0(n_params, s), s.sigma0, opts)


# ---------------------------------------------------------------------------------------------
# The search history: one file per generation


def _history_file(ckpt_dir: Path, generation: int) -> Path:
    return ckpt_dir / HISTORY / f"gen_{generation:06d}.npz"


def _save_generation(
    ckpt_dir: Path,
    generation: int,
    candidates: np.ndarray,
    returns: np.ndarray,
    score: tuple[float, float] | None,
) -> None:
    """Write one generation's candidates, returns, their best/mean/worst and the mean
    parameters' `score` (mean, std) if they were scored, atomically. A rerun generation
    (resumed after a kill between this and its checkpoint) replaces the file."""
    arrays = {
        "candidates": candidates,
        "returns": returns,
        "best": np.float64(returns.max()),
        "mean": np.float64(returns.mean()),
        "worst": np.float64(returns.min()),
    }
    if score is not None:
        arrays["eval"], arrays["eval_std"] = np.float64(score[0]), np.float64(score[1])
    path = _history_file(ckpt_dir, generation)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _read_history(ck_path: Path, step: int, read: Callable[[int, Any], None]) -> None:
    """Call `read(generation, npz)` on the history file of each generation 1..`step` of the
    checkpoint at `ck_path` (a later file is of a generation killed midway). A file that is
    missing or lacks what `read` asks for is a one-line UserError."""
    for generation in range(1, step + 1):
        file = _history_file(ck_path.parent, generation)
        try:
            with np.load(file, allow_pickle=False) as f:
                read(generation, f)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(
                f"{file}: search history of {ck_path} is missing or unreadable "
                f"({type(err).__name__})"
            ) from None


def _new_curves() -> dict[str, list]:
    return {"best": [], "mean": [], "worst": [], "eval_gen": [], "eval": []}


def _load_curves(ck_path: Path, step: int) -> dict[str, list]:
    """The curves of generations 1..`step`, from their history files."""
    curves = _new_curves()

    def read(generation: int, f: Any) -> None:
        for key in ("best", "mean", "worst"):
            curves[key].append(float(f[key]))
        if "eval" in f.files:
            curves["eval_gen"].append(generation)
            curves["eval"].append(float(f["eval"]))

    _read_history(ck_path, step, read)
    return curves


def _add_curves_to_history(ck_path: Path, step: int, curves: dict[str, list]) -> None:
    """Rewrite the history files of a checkpoint written by 54a6e29 (curves in the checkpoint,
    candidates and returns alone in the files) with their curves, once, so that the resumed run
    can be resumed again. Its scores' std was not kept: it is NaN."""
    scores = dict(zip(curves["eval_gen"], curves["eval"]))
    old: list[tuple[int, np.ndarray, np.ndarray]] = []

    def read(generation: int, f: Any) -> None:
        if "best" not in f.files:
            old.append((generation, f["candidates"], f["returns"]))

    _read_history(ck_path, step, read)
    for generation, candidates, returns in old:
        score = (scores[generation], np.nan) if generation in scores else None
        _save_generation(ck_path.parent, generation, candidates, returns, score)


def _check_settings(ck_path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    for key in ("population", "sigma0", "seed"):
        if saved[key] != now[key]:
            raise UserError(
                f"{ck_path}: cannot resume, {key} is {saved[key]!r} in the checkpoint but "
                f"{now[key]!r} now (use another run_name or the same setting)"
            )
    if not torch.equal(saved["x0"], now["x0"]):
        raise UserError(
            f"{ck_path}: cannot resume, x0 differs from the checkpoint's "
            "(use another run_name or the same setting)"
        )


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
    model_spec: dict | None = None,
) -> ESResult:
    """Maximise the return that `fitness_returns(candidates (P, n), generation) -> (P,)` gives.

    `eval_fn(params) -> (mean, std)` scores the current mean on more trials every
    `settings.eval_every` generations. Checkpoints go to `ckpt_dir` every generation, each
    generation's candidates, returns and curves to `ckpt_dir/history/` (see the module
    docstring). `model_spec`, what the parameters are (a class and its config), is saved with
    each checkpoint as its model.yaml.
    """
    ckpt_dir = Path(ckpt_dir)
    es = _make_es(n_params, settings)  # seeds numpy's global RNG
    config = config | {"n_params": n_params}
    es_settings = {
        "population": settings.population,
        "sigma0": float(settings.sigma0),
        "seed": settings.seed,
        "x0": torch.from_numpy(_x0(n_params, settings)),
    }
    curves = _new_curves()
    best_params, best_return = np.zeros(n_params), -np.inf
    scored_params, scored_return = None, -np.inf
    start = 0
    if latest_checkpoint(ckpt_dir) is not None:
        ck = load_checkpoint(ckpt_dir)
        check_compatible(ck.config, config, (shape_keys or []) + ["n_params"], ck.path)
        if "cma" not in ck.state:
            raise UserError(
                f"{ck.path}: written by an older evolve (the whole history in each checkpoint), "
                "which cannot be resumed; use another run_name"
            )
        _check_settings(ck.path, ck.state["es_settings"], es_settings)
        restore_cma_state(es, ck.state["cma"])
        set_rng_state(rng_from_tensors(ck.state["rng"]))
        if "curves" in ck.state:  # written by 54a6e29, which kept them in the checkpoint
            curves = ck.state["curves"]
            _add_curves_to_history(ck.path, ck.step, curves)
        else:
            curves = _load_curves(ck.path, ck.step)
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
        es.tell(list(candidates), (-returns).tolist())  # cma minimises fitness = -return
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
        score = None
        if eval_fn is not None and settings.eval_every and (gen + 1) % settings.eval_every == 0:
            m, sd = eval_fn(np.asarray(es.mean))
            score = float(m), float(sd)
            if m > scored_return:
                scored_params, scored_return = np.asarray(es.mean).copy(), float(m)
            curves["eval_gen"].append(gen + 1)
            curves["eval"].append(float(m))
            line += f"; mean params scored {m:.2f} +- {sd:.2f}"
        _save_generation(ckpt_dir, gen + 1, candidates, returns, score)
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
            "best_params": torch.from_numpy(best_params),
            "mean_params": torch.from_numpy(np.asarray(es.mean).copy()),
        }
        if scored_params is not None:
            arrays["scored_params"] = torch.from_numpy(scored_params)
        save_checkpoint(
            ckpt_dir,
            gen + 1,
            arrays,
            {
                "rng": rng_tensors(rng_state()),
                "cma": cma_state(es),
                "es_settings": es_settings,
                "best_return": best_return,
                "scored_return": scored_return,
            },
            config,
            keep=2,  # the previous one survives a kill while this one is written
            model_spec=model_spec,
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
    return controller_params(ck, which), ck.config


def controller_params(ck: Checkpoint, which: str = "auto") -> np.ndarray:
    """`load_controller_params`'s parameters, from an evolve checkpoint already loaded."""
    if which == "auto":
        which = "scored" if "scored_params" in ck.model else "mean"
    key = f"{which}_params"
    if key not in ck.model:
        raise UserError(f"{ck.path}: no {which} parameters (no evaluation ran); use params=mean")
    return ck.model[key].double().numpy()


def load_search_history(path: Path) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Every generation's candidates (P, n) and the returns they were selected by (P,), up to the
    generation of an evolve checkpoint (a step folder, a checkpoints folder or its run stage),
    and the config that made them."""
    ck = load_checkpoint(path)
    if "candidates" in ck.model:  # written before the history moved out of the checkpoint
        candidates = [x.double().numpy() for x in ck.model["candidates"]]
        returns = [-f.double().numpy() for f in ck.model["fitness"]]  # fitness = -return
        return candidates, returns, ck.config
    folder = ck.path.parent / HISTORY
    if "cma" not in ck.state or not folder.is_dir():
        raise UserError(f"{ck.path}: not an evolve checkpoint with a search history (no {folder})")
    candidates, returns = [], []

    def read(generation: int, f: Any) -> None:
        candidates.append(f["candidates"])
        returns.append(f["returns"])

    _read_history(ck.path, ck.step, read)
    return candidates, returns, ck.config
