"""Trained models loaded back from their checkpoints, for the stages that use them.

V is trained by `wm train-vae` and read by encode, dream-video, the agent and fidelity; M by
`wm train-m`; C by `wm train-controller` and read by evaluate, collect-agent and fidelity.
Loading them lives here so that none of those stages imports a training stage. Every one is
rebuilt from its checkpoint's model.yaml alone (`gen_core.checkpoint.load_model`); C, a flat
parameter vector rather than a module, keeps its `ControllerSpec` there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import yaml

from gen_core.checkpoint import Checkpoint, build_model, load_checkpoint, load_model
from gen_core.errors import UserError
from gen_core.vae import VAE
from worldmodels.controller import ControllerSpec

V_CLASSES = ("VAE",)


def vae_from_checkpoint(path: str | Path, map_location="cpu") -> tuple[VAE, Checkpoint]:
    """V rebuilt from its checkpoint's model.yaml (step folder, checkpoints folder or stage
    folder), in eval mode, and the checkpoint (UserError naming the path if it is not V's)."""
    return load_model(path, map_location, kinds=V_CLASSES)


def load_vae(path: str | Path, map_location="cpu") -> tuple[VAE, dict]:
    """V from a checkpoint (step folder, checkpoints folder or stage folder), in eval mode.

    Returns the model and the config of the run that trained it.
    """
    model, ck = vae_from_checkpoint(path, map_location)
    return model, ck.config


M_CLASSES = ("MDNRNN", "MDNTransformer")


def load_m(path: str | Path, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """M, the MDN-RNN or the Transformer M, rebuilt from its checkpoint's model.yaml alone, in
    eval mode; and the config of the run that trained it. Dream with `model.stepper()`."""
    model, ck = load_model(path, map_location, kinds=M_CLASSES)
    return model, ck.config


CONTROLLER_CLASS = "LinearController"


def controller_model_spec(spec: ControllerSpec) -> dict:
    """What an evolve checkpoint keeps as model.yaml for C: the class and its ControllerSpec."""
    return {"class": CONTROLLER_CLASS, "config": dataclasses.asdict(spec)}


def load_controller(
    path: str | Path, which: str = "auto"
) -> tuple[np.ndarray, ControllerSpec, dict]:
    """C from an evolve checkpoint (step folder, checkpoints folder or stage folder): its flat
    parameters, its `ControllerSpec` (from model.yaml) and the config of the run that evolved it.

    which: "scored", "mean", "best" or "auto", as `worldmodels.evolve.controller_params`.
    """
    from worldmodels.evolve import controller_params  # cma only where C is read

    ck = load_checkpoint(path)
    found = (ck.model_spec or {}).get("class")
    if found != CONTROLLER_CLASS:
        raise UserError(
            f"{ck.path}: not a controller checkpoint (model.yaml "
            + (f"holds a {found})" if ck.model_spec else "is missing)")
            + "; run 'wm train-controller'"
        )
    known = {f.name for f in dataclasses.fields(ControllerSpec)}
    config = dict(ck.model_spec.get("config") or {})
    if unknown := sorted(set(config) - known):
        raise UserError(
            f"{ck.path}: model.yaml has {unknown[0]!r}, which ControllerSpec does not know"
        )
    spec = ControllerSpec(**config)
    params = controller_params(ck, which)  # the checkpoint is read once
    if params.shape != (spec.n_params,):
        raise UserError(
            f"{ck.path}: {params.shape[-1]} controller parameters, but its model.yaml describes "
            f"{spec.n_params}"
        )
    return params, spec, ck.config


def check_controller_spec(loaded: ControllerSpec, agent: ControllerSpec, path: str | Path) -> None:
    """UserError (one line, naming `path`) unless C, as loaded, reads what V and M give the agent
    (`agent`, from `worldmodels.agent.load_agent_parts`): V's z_dim, M's hidden features (or
    none, the z-only variant) and M's action size."""
    fits = (
        loaded.z_dim == agent.z_dim
        and loaded.hidden in (0, agent.hidden)
        and loaded.action_dim == agent.action_dim
    )
    if not fits:
        raise UserError(
            f"{path}: the controller reads z_dim {loaded.z_dim} + hidden {loaded.hidden} and "
            f"makes {loaded.action_dim} actions, but V and M give z_dim {agent.z_dim} + hidden "
            f"{agent.hidden} and {agent.action_dim} actions; use the V and M it was evolved with"
        )


# ---------------------------------------------------------------------------------------------
# A packed agent: V, M and C in one small folder (`wm pack-agent`), such as the one shipped with
# the package for `wm play`.

SHIPPED_AGENT = Path(__file__).parent / "assets" / "carracing"
PACKED_WEIGHTS = "agent.pt"  # {"vae": state_dict, "m": state_dict, "controller": params}
PACKED_SPEC = "agent.yaml"  # what rebuilds them (`models`) and how they were made (`made`)


def load_packed_agent(folder: str | Path = SHIPPED_AGENT):
    """(V, M, C's parameters, C's spec, the spec file as a dict) of a packed agent: weights
    stored in fp16 come back as float32, the models in eval mode."""
    folder = Path(folder)
    try:
        spec = yaml.safe_load((folder / PACKED_SPEC).read_text(encoding="utf-8"))
        weights = torch.load(folder / PACKED_WEIGHTS, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, yaml.YAMLError) as err:
        raise UserError(
            f"{folder}: not a packed agent ({type(err).__name__}); 'wm pack-agent' makes one"
        ) from None
    models = []
    for name in ("vae", "m"):
        model = build_model(spec["models"][name], folder / PACKED_SPEC)
        state = {k: v.float() if v.is_floating_point() else v for k, v in weights[name].items()}
        model.load_state_dict(state)
        models.append(model.eval())
    params = weights["controller"].float().numpy()
    return models[0], models[1], params, ControllerSpec(**spec["models"]["controller"]), spec
