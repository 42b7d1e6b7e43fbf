"""CMA-ES's state as plain data: what `worldmodels/evolve.py` checkpoints instead of a history.

`cma_state(es)` turns a `cma.CMAEvolutionStrategy` into tensors, numbers, strings and lists that
load with `torch.load(weights_only=True)` (no pickled objects), of a size that does not grow with
the generations; `restore_cma_state(es, state)` sets it back into a strategy freshly built with
the same x0, sigma0 and options, so a resumed run goes on with bit-identical candidates.
`rng_tensors` / `rng_from_tensors` do the same for the RNG states `cma` draws from.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # cma warns that matplotlib is missing; plots are ours
    import cma

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


def rng_tensors(state: dict[str, Any]) -> dict[str, Any]:
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


def rng_from_tensors(saved: dict[str, Any]) -> dict[str, Any]:
    """What `set_rng_state` takes, from `rng_tensors`'s (or a 54a6e29 checkpoint's
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
