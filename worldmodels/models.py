"""Trained models loaded back from their checkpoints, for the stages that use them.

V is trained by `wm train-vae` and read by encode, dream-video, the agent and fidelity; loading
it lives here so that none of them imports the training stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gen_core.checkpoint import Checkpoint, load_checkpoint, load_model
from gen_core.errors import UserError
from gen_core.vae import VAE, VAEConfig


def vae_from_checkpoint(ck: Checkpoint) -> VAE:
    """V built from a loaded checkpoint, in eval mode (UserError if it is not V's)."""
    if "vae_config" not in ck.state:
        raise UserError(f"{ck.path}: not a VAE checkpoint (no vae_config); run 'wm train-vae'")
    vcfg = dict(ck.state["vae_config"])
    vcfg["widths"] = tuple(vcfg["widths"])  # a list once through the checkpoint's state
    model = VAE(VAEConfig(**vcfg))
    model.load_state_dict(ck.model)
    model.eval()
    return model


def load_vae(path: str | Path, map_location="cpu") -> tuple[VAE, dict]:
    """V from a checkpoint (step folder, checkpoints folder or stage folder), in eval mode.

    Returns the model and the config of the run that trained it.
    """
    ck = load_checkpoint(path, map_location=map_location)
    return vae_from_checkpoint(ck), ck.config


M_CLASSES = ("MDNRNN", "MDNTransformer")


def load_m(path: str | Path, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """M, the MDN-RNN or the Transformer M, rebuilt from its checkpoint's model.yaml alone, in
    eval mode; and the config of the run that trained it. Dream with `model.stepper()`."""
    model, ck = load_model(path, map_location, kinds=M_CLASSES)
    return model, ck.config
