"""CMA-ES with the `cma` package, as a visible ask/tell loop that checkpoints every generation.

`cma` minimises, so the loop tells it `fitness = -return`. Each generation costs constant I/O,
however long the run:

- The checkpoint (`ckpt_dir/step_<gen>/`, the last two kept) holds CMA-ES's own state rather than
  the history that led to it: `cma_state` walks the `cma.CMAEvolutionStrategy` object graph
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

import importlib
import sys
import time
import types
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from gen_core.io import atomic_path
from gen_core.runs import Run, progress

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
# CMA-ES state as plain data
#
# `cma_state(es)` walks `vars(es)` and, recursively, the attributes of every object of a `cma`
# class it holds (the sampler `sm`, `adapt_sigma`, `best`, `fit`, `sp`, ...). Entries are keyed by
# attribute path ("sigma", "sm.C", "adapt_sigma.ps", "best.x"); a value is a float, string,
# bool or None as is, or a small dict tagged by its kind:
#   {"int": index}: a Python int, kept in the int64 tensor `ints` at that index. Pickled, an int
#       takes 1 to 5 bytes by its size, so the counters (countevals, best.evals, ...) would make
#       the checkpoint grow with the generations by a few bytes; in a tensor they take 8 each;
#   {"array": buffer, "offset", "shape", "strides", "dtype", "writeable", "memo"}: an ndarray,
#       as a view into `buffers[buffer]` (the raw bytes of the memory it lives in), so arrays
#       that share memory (np.diag(C) and C, rows of one population) share it again on resume;
#   {"scalar": 0-d tensor}: a numpy scalar (np.float64 stays np.float64);
#   {"list" | "tuple": [...]}, {"dict": [[key, value], ...]}: containers (keys may be tuples);
#   {"object": "module:Class", "memo", ["items"]}: a `cma` object, whose attributes follow as
#       entries of their own ("items": the contents of one that is also a list or dict);
#   {"ref": memo}: an object met before under another path (es.C is es.sm.C, es.sp0 is es.sp);
#   {"keep": memo}: left as the fresh strategy builds it (see _KEEP, and functions/methods).
# Strings, paths included, are interned: pickled once per value, whichever objects held them, so
# a resumed run's checkpoint has the size of one that ran straight through. Anything else
# raises TypeError, so a `cma` that keeps state of another kind fails loudly rather than
# resuming inexactly. `restore_cma_state` reads the entries in the order they were written, so
# a ref always names something already restored.

# Attributes not saved: the fresh strategy's own are kept. `opts` follows from x0, sigma0 and
# the options (the loop never changes them) and holds functions; the logger only writes files
# (never, with verbose=-9). The fitness histories `fit.hist`, `fit.histbest`, `fit.histmedian`
# and `hsiglist` grow with the generations and feed only `es.stop()`'s termination tests, which
# `evolve` never asks (it runs a set number of generations): after a resume they hold the
# resumed part only.
_KEEP = frozenset({"opts", "logger", "fit.hist", "fit.histbest", "fit.histmedian", "hsiglist"})
_PLAIN = (type(None), bool, int, float, str)  # int: only those beyond int64
_INT64 = range(-(2**63), 2**63)


def _is_cma_object(v: Any) -> bool:
    module = type(v).__module__
    return (module == "cma" or module.startswith("cma.")) and not isinstance(v, type)


def _is_code(v: Any) -> bool:
    """Functions, methods, classes and other callables the fresh strategy holds as well."""
    code = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)
    return isinstance(v, code) or (callable(v) and not _is_cma_object(v))


class _Saver:
    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.buffers: list[torch.Tensor] = []
        self.ints: list[int] = []
        self._buffer_of: dict[int, int] = {}  # id(memory owner) -> index in buffers
        self._memo: dict[int, int] = {}  # id(object) -> memo number
        self._alive: list[Any] = []  # keeps the objects whose ids are memo keys alive

    def memo(self, v: Any) -> int:
        self._memo[id(v)] = n = len(self._memo)
        self._alive.append(v)
        return n

    def walk(self, obj: Any, prefix: str) -> None:
        for name, v in vars(obj).items():
            path = sys.intern(prefix + name)
            if path in _KEEP or _is_code(v):
                self.entries[path] = {"keep": self.memo(v)}
            elif id(v) in self._memo:
                self.entries[path] = {"ref": self._memo[id(v)]}
            elif _is_cma_object(v):
                cls = type(v)
                entry: dict[str, Any] = {
                    "object": sys.intern(f"{cls.__module__}:{cls.__qualname__}"),
                    "memo": self.memo(v),
                }
                if isinstance(v, list):
                    entry["items"] = [self.encode(x, path) for x in v]
                elif isinstance(v, dict):
                    entry["items"] = [
                        [self.encode(k, path), self.encode(x, path)] for k, x in v.items()
                    ]
                self.entries[path] = entry
                self.walk(v, path + ".")
            else:
                self.entries[path] = self.encode(v, path)

    def encode(self, v: Any, path: str) -> Any:
        if type(v) is int and v in _INT64:
            self.ints.append(v)
            return {"int": len(self.ints) - 1}
        if type(v) is str:
            return sys.intern(v)
        if type(v) in _PLAIN:
            return v
        if id(v) in self._memo:
            return {"ref": self._memo[id(v)]}
        if isinstance(v, np.ndarray):
            return self.array(v, path)
        if isinstance(v, np.generic) and not isinstance(v, (np.object_, np.void)):
            return {"scalar": torch.from_numpy(np.array(v))}
        if type(v) is tuple:
            return {"tuple": [self.encode(x, path) for x in v]}
        if type(v) is range:  # cma keeps some index sets as ranges (small populations)
            return {"range": [self.encode(x, path) for x in (v.start, v.stop, v.step)]}
        if type(v) is list:
            n = self.memo(v)
            return {"list": [self.encode(x, path) for x in v], "memo": n}
        if type(v) is dict:
            n = self.memo(v)
            items = [[self.encode(k, path), self.encode(x, path)] for k, x in v.items()]
            return {"dict": items, "memo": n}
        raise TypeError(f"cma state: cannot save {path} ({type(v).__module__}.{type(v).__name__})")

    def array(self, a: np.ndarray, path: str) -> dict[str, Any]:
        if a.dtype.hasobject or a.dtype.fields is not None:
            raise TypeError(f"cma state: cannot save {path} (array of dtype {a.dtype})")
        owner = a
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        if not (owner.flags.c_contiguous or owner.flags.f_contiguous):
            owner = a = np.array(a)  # a view of memory no array owns: save a copy
        if id(owner) not in self._buffer_of:
            self._buffer_of[id(owner)] = len(self.buffers)
            self._alive.append(owner)
            raw = owner.ravel(order="K").view(np.uint8)  # its bytes in memory order
            self.buffers.append(torch.from_numpy(raw.copy()))
        return {
            "array": self._buffer_of[id(owner)],
            "offset": a.ctypes.data - owner.ctypes.data,
            "shape": list(a.shape),
            "strides": list(a.strides),
            "dtype": sys.intern(a.dtype.str),
            "writeable": bool(a.flags.writeable),
            "memo": self.memo(a),
        }


def cma_state(es: cma.CMAEvolutionStrategy) -> dict[str, Any]:
    """CMA-ES's state as tensors and plain data, for `restore_cma_state` (see above)."""
    saver = _Saver()
    saver.walk(es, "")
    ints = torch.tensor(saver.ints, dtype=torch.int64)
    return {"buffers": saver.buffers, "ints": ints, "attributes": saver.entries}


def _cma_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if module != "cma" and not module.startswith("cma."):
        raise ValueError(f"cma state: {name} is not a cma class")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls


def restore_cma_state(es: cma.CMAEvolutionStrategy, state: dict[str, Any]) -> None:
    """Set what `cma_state` saved back into `es`, a strategy freshly built with the same x0,
    sigma0 and options (what is not saved stays as it built it)."""
    buffers = [b.numpy() for b in state["buffers"]]
    ints = state["ints"].tolist() if "ints" in state else []  # 54a6e29 kept ints as they are
    memo: dict[int, Any] = {}

    def decode(v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        if "int" in v:
            return ints[v["int"]]
        if "ref" in v:
            return memo[v["ref"]]
        if "array" in v:
            a = np.ndarray(
                tuple(v["shape"]),
                np.dtype(v["dtype"]),
                buffer=buffers[v["array"]],
                offset=v["offset"],
                strides=tuple(v["strides"]),
            )
            a.flags.writeable = v["writeable"]
            memo[v["memo"]] = a
            return a
        if "scalar" in v:
            return v["scalar"].numpy()[()]
        if "tuple" in v:
            return tuple(decode(x) for x in v["tuple"])
        if "range" in v:
            return range(*(decode(x) for x in v["range"]))
        if "list" in v:
            memo[v["memo"]] = out = []
            out.extend(decode(x) for x in v["list"])
            return out
        if "dict" in v:
            memo[v["memo"]] = d = {}
            for k, x in v["dict"]:
                d[decode(k)] = decode(x)
            return d
        raise ValueError(f"cma state: unknown entry {sorted(v)}")

    objects: dict[str, Any] = {"": es}
    names: dict[str, set[str]] = {"": set()}
    for path, v in state["attributes"].items():
        parent_path, _, name = path.rpartition(".")
        parent = objects[parent_path]
        names[parent_path].add(name)
        if isinstance(v, dict) and "keep" in v:
            if not hasattr(parent, name):
                raise ValueError(f"cma state: a fresh strategy has no {path} to keep")
            memo[v["keep"]] = getattr(parent, name)
        elif isinstance(v, dict) and "object" in v:
            cls = _cma_class(v["object"])
            obj = getattr(parent, name, None)
            if type(obj) is not cls:
                obj = cls.__new__(cls)  # made during the run; its attributes follow
            memo[v["memo"]] = obj
            if isinstance(obj, list):
                list.__setitem__(obj, slice(None), [decode(x) for x in v.get("items", [])])
            elif isinstance(obj, dict):
                dict.clear(obj)
                for k, x in v.get("items", []):
                    dict.__setitem__(obj, decode(k), decode(x))
            setattr(parent, name, obj)
            objects[path], names[path] = obj, set()
        else:
            setattr(parent, name, decode(v))
    for path, obj in objects.items():  # drop what the fresh strategy has and the saved had not
        for name in set(vars(obj)) - names[path]:
            delattr(obj, name)


# ---------------------------------------------------------------------------------------------
# RNG states in tensors


def _rng_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """`rng_state()` with the Mersenne Twisters' ints in int64 tensors: pickled, an int takes 1
    to 5 bytes by its size, so the checkpoint's size would vary with the draws by tens of
    bytes."""
    version, internal, gauss_next = state["python"]
    mt = state["numpy"]
    return state | {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": float("nan") if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "bit_generator": sys.intern(mt["bit_generator"]),
            "key": torch.tensor(mt["state"]["key"], dtype=torch.int64),
            "pos_has_gauss": torch.tensor([mt["state"]["pos"], mt["has_gauss"]]),
            "gauss": float(mt["gauss"]),
        },
    }


def _rng_state(saved: dict[str, Any]) -> dict[str, Any]:
    """What `set_rng_state` takes, from `_rng_tensors`'s (or a 54a6e29 checkpoint's
    `rng_state()`)."""
    py, mt = saved["python"], saved["numpy"]
    if not isinstance(py, dict):
        return saved
    gauss_next = None if np.isnan(py["gauss_next"]) else py["gauss_next"]
    pos, has_gauss = mt["pos_has_gauss"].tolist()
    return saved | {
        "python": [py["version"], py["internal"].tolist(), gauss_next],
        "numpy": {
            "bit_generator": mt["bit_generator"],
            "state": {"key": mt["key"].tolist(), "pos": pos},
            "has_gauss": has_gauss,
            "gauss": mt["gauss"],
        },
    }


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
        set_rng_state(_rng_state(ck.state["rng"]))
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
                "rng": _rng_tensors(rng_state()),
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
    if which == "auto":
        which = "scored" if "scored_params" in ck.model else "mean"
    key = f"{which}_params"
    if key not in ck.model:
        raise UserError(f"{ck.path}: no {which} parameters (no evaluation ran); use params=mean")
    return ck.model[key].double().numpy(), ck.config


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
