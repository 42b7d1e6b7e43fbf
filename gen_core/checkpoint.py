"""Checkpoints: one folder per step, written atomically, loaded safely, resumed by pointer.

Layout under a checkpoint folder `ckpt/`:

    ckpt/step_00000012/model.pt    model weights (state_dict)
    ckpt/step_00000012/state.pt    training state: optimiser, RNG states, step, anything else
    ckpt/step_00000012/config.yaml the resolved config of the run that wrote it
    ckpt/step_00000012/model.yaml  the model's class and its config dataclass, all it takes to
                                   rebuild the model (`load_model`)
    ckpt/latest                    the name of the newest complete step folder

A step folder is written under a temporary name and renamed when complete, and `latest` is
replaced atomically after that, so a job killed at any point leaves the previous checkpoint
usable. Files load with `torch.load(weights_only=True)`: no pickled code is ever executed.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gen_core.errors import UserError
from gen_core.io import atomic_write_text

LATEST = "latest"


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    step: int
    model: dict[str, Any]  # state_dict
    state: dict[str, Any]  # optimiser, RNG, counters, ...
    config: dict[str, Any]  # resolved config that wrote it
    path: Path
    model_spec: dict[str, Any] | None = None  # {"class": ..., "config": {...}} from model.yaml


# Models a checkpoint can rebuild: class name -> "module:Class:ConfigClass". Lazy, so loading
# one model imports only its module.
MODELS = {
    "VAE": "gen_core.vae:VAE:VAEConfig",
    "MDNRNN": "gen_core.mdnrnn:MDNRNN:MDNRNNConfig",
    "MDNTransformer": "gen_core.mdn_transformer:MDNTransformer:MDNTransformerConfig",
    "Transformer": "gen_core.transformer:Transformer:TransformerConfig",
    "GAN": "gen_core.gan:GAN:GANConfig",
    "Diffusion": "gen_core.diffusion:Diffusion:DiffusionConfig",
    "LatentDiffusion": "gen_core.latent_diffusion:LatentDiffusion:LatentDiffusionConfig",
    "FeatureNet": "gen_core.image_metrics:FeatureNet:FeatureConfig",
}


def model_spec(model: torch.nn.Module) -> dict[str, Any]:
    """What `save_checkpoint(model_spec=...)` stores: the class and its config dataclass."""
    name = type(model).__name__
    if name not in MODELS:
        raise ValueError(f"{name}: not a model a checkpoint can rebuild; add it to MODELS")
    config = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(model.config).items()
    }
    return {"class": name, "config": config}


def build_model(spec: dict[str, Any], where: Path | str = "") -> torch.nn.Module:
    """A freshly initialised model from a `model_spec` (its weights are loaded separately)."""
    name = spec.get("class")
    if name not in MODELS:
        raise UserError(f"{where}: unknown model class {name!r} in model.yaml")
    module, cls_name, cfg_name = MODELS[name].split(":")
    mod = importlib.import_module(module)
    cfg_cls = getattr(mod, cfg_name)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    values = {}
    for k, v in spec.get("config", {}).items():
        if k not in fields:
            raise UserError(f"{where}: model.yaml has {k!r}, which {cfg_name} does not know")
        values[k] = tuple(v) if isinstance(fields[k].default, tuple) else v
    return getattr(mod, cls_name)(cfg_cls(**values))


def rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's global and torch's RNGs (safe to save with torch.save)."""
    state = {
        "python": _to_tensor_safe(random.getstate()),
        "numpy": _to_tensor_safe(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tensor_safe(obj: Any) -> Any:
    """Turn numpy arrays/scalars inside nested containers into lists/ints for weights_only."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_tensor_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_tensor_safe(v) for v in obj]
    return obj


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 3,
    model_spec: dict[str, Any] | None = None,
) -> Path:
    """Write `step_<step>/` under `ckpt_dir` atomically, point `latest` at it, prune old ones.

    Args:
        model: the model's state_dict (tensors).
        state: training state (optimiser state_dict, `rng_state()`, counters); tensors,
            numbers, strings, lists and dicts only.
        config: the resolved config as plain data.
        keep: how many step folders to keep (0 keeps all).
        model_spec: `model_spec(model)`, written as model.yaml so `load_model` can rebuild it.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(model, tmp / "model.pt")
    torch.save({**state, "step": step}, tmp / "state.pt")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if model_spec is not None:
        (tmp / "model.yaml").write_text(yaml.safe_dump(model_spec, sort_keys=False), "utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_dir / LATEST, name + "\n")
    if keep > 0:
        steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete step folder under `ckpt_dir`, or None if there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        path = ckpt_dir / pointer.read_text(encoding="utf-8").strip()
        if (path / "model.pt").is_file():
            return path
    steps = sorted(p for p in ckpt_dir.glob("step_*") if (p / "state.pt").is_file())
    return steps[-1] if steps else None


def _step_folder(path: str | os.PathLike) -> Path:
    """`path` if it is a step folder, else the latest step folder under it (a checkpoint folder
    or a run stage). Raises UserError (one line, naming the path) if there is none."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        found = latest_checkpoint(candidate) if candidate.is_dir() else None
        if found is not None:
            return found
    raise UserError(f"{path}: no checkpoint found (expected model.pt or a 'latest' pointer)")


def _read_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}


def checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The resolved config saved with a checkpoint (found as `load_checkpoint` finds it),
    without loading its weights."""
    path = _step_folder(path)
    try:
        return _read_config(path)
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: checkpoint config is unreadable ({type(err).__name__})") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Load a step folder, or the latest one if `path` is a checkpoint folder or a run stage.

    Raises UserError (one line, naming the path) if nothing loadable is there.
    """
    path = _step_folder(path)
    try:
        model = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        config = _read_config(path)
        spec = None
        if (path / "model.yaml").is_file():
            spec = yaml.safe_load((path / "model.yaml").read_text(encoding="utf-8"))
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, yaml.YAMLError) as err:
        raise UserError(
            f"{path}: checkpoint is unreadable or corrupt ({type(err).__name__})"
        ) from None
    return Checkpoint(int(state.get("step", 0)), model, state, config, path, spec)


def load_model(
    path: str | os.PathLike, map_location: Any = "cpu", kinds: tuple[str, ...] = ()
) -> tuple[torch.nn.Module, Checkpoint]:
    """The model of a checkpoint, rebuilt from its model.yaml alone, in eval mode; `kinds`
    (class names) limits what is accepted, with a one-line error naming the path otherwise."""
    ck = load_checkpoint(path, map_location=map_location)
    if ck.model_spec is None:
        raise UserError(f"{ck.path}: no model.yaml, so no model to rebuild (a training state?)")
    if kinds and ck.model_spec.get("class") not in kinds:
        raise UserError(
            f"{ck.path}: holds a {ck.model_spec.get('class')}, expected {' or '.join(kinds)}"
        )
    model = build_model(ck.model_spec, ck.path)
    try:
        model.load_state_dict(ck.model)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{ck.path}: weights do not fit model.yaml ({first})") from None
    return model.to(map_location).eval(), ck


def check_compatible(
    saved: dict[str, Any], current: dict[str, Any], keys: list[str], where: Path
) -> None:
    """Raise UserError if a shape-defining key differs between a checkpoint and the config.

    `keys` are dotted paths into the config dicts (e.g. "model.z_dim").
    """

    def get(d: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return None
            d = d[part]
        return d

    for key in keys:
        a, b = get(saved, key), get(current, key)
        if a != b:
            raise UserError(
                f"{where}: cannot resume, {key} is {a!r} in the checkpoint but {b!r} in the config "
                "(use another run_name or the same setting)"
            )
