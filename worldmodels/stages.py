"""The stage registry: every `wm` command, the module that holds it and the config section it reads.

One table, read by both `wm` (worldmodels/cli.py: one subcommand per row) and `wm pipeline`
(worldmodels/pipeline.py: which config class checks a section of the pipeline file, and which
function runs it). Each stage lives in a module of its own, named after its command, holding its
config class and `main(cfg)`; modules are named here as strings and imported only when their
command runs, so `wm --help` stays fast and a broken stage cannot break the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

WHOLE_FILE = "*"  # the section of a stage that reads the whole pipeline file (`wm pipeline`)


@dataclass(frozen=True)
class Stage:
    """One `wm` command."""

    name: str  # the command: `wm <name>`
    module: str  # where the config class and the main function live
    config: str  # the config class's name in that module
    help: str  # one line for `wm --help`
    section: str | None = None  # its section of a pipeline file; None: none, WHOLE_FILE: all
    func: str = "main"  # the function that runs it, `func(cfg) -> int | None`

    def load(self) -> tuple[type, Callable]:
        """(config class, main function), importing the stage's module."""
        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.func)


STAGES: tuple[Stage, ...] = (
    Stage(
        "pipeline",
        "worldmodels.pipeline",
        "PipelineConfig",
        "the whole chain (collect .. evaluate) from one config, skipping finished stages",
        section=WHOLE_FILE,
    ),
    Stage(
        "collect",
        "rollouts.collect",
        "CollectConfig",
        "collect episodes from a gymnasium pixel env in parallel",
        section="collect",
    ),
    Stage(
        "check-data",
        "rollouts.check_data",
        "CheckConfig",
        "verify every episode of a rollout store; list bad ones",
    ),
    Stage(
        "export-minari",
        "rollouts.export_minari",
        "ExportMinariConfig",
        "write an episode store as a local Minari dataset (read back with store=minari:<id>)",
    ),
    Stage(
        "train-vae",
        "worldmodels.train_vae",
        "TrainVAEConfig",
        "train the VAE (V) on the frames of a rollout store",
        section="vae",
    ),
    Stage(
        "encode",
        "worldmodels.encode",
        "EncodeConfig",
        "encode every stored episode to VAE latents (mu, logvar per frame)",
        section="encode",
    ),
    Stage(
        "train-m",
        "worldmodels.train_m",
        "TrainMConfig",
        "train M (MDN-RNN or Transformer: next latent, reward, episode end) on encoded episodes",
        section="m",
    ),
    Stage(
        "dream-video",
        "worldmodels.dream_video",
        "DreamVideoConfig",
        "GIF of a real episode beside M's dream of it (decoded with V)",
        section="dream_video",
    ),
    Stage(
        "train-controller",
        "worldmodels.train_controller",
        "TrainControllerConfig",
        "evolve C with CMA-ES in the real env (Ray) or inside M's dream",
        section="controller",
    ),
    Stage(
        "evaluate",
        "worldmodels.evaluate",
        "EvaluateConfig",
        "score a controller or a baseline policy over N real-env episodes",
        section="evaluate",
    ),
    Stage(
        "collect-agent",
        "worldmodels.collect_agent",
        "CollectAgentConfig",
        "add episodes driven by the current controller (with exploration) to the store",
        section="collect_agent",
    ),
    Stage(
        "pack-agent",
        "worldmodels.pack_agent",
        "PackAgentConfig",
        "pack a finished run's V, M and C (fp16) into one small folder for wm play",
    ),
    Stage(
        "play",
        "worldmodels.play",
        "PlayConfig",
        "GIF of an agent driving: the real env, V's view and M's dream side by side",
    ),
    Stage(
        "fidelity",
        "worldmodels.fidelity",
        "FidelityConfig",
        "does the dream rank policies as the real env does? dream vs real returns, M diagnostics",
        section="fidelity",
    ),
)

# `wm gen <name>`: standalone image and text generation from the core models (no pipeline part).
GEN_STAGES: tuple[Stage, ...] = (
    Stage(
        "train-text",
        "worldmodels.gen.text",
        "TrainTextConfig",
        "train a character- or byte-level Transformer on a text file",
    ),
    Stage(
        "sample-text",
        "worldmodels.gen.text",
        "SampleTextConfig",
        "sample text from a train-text checkpoint",
        func="sample_main",
    ),
    Stage(
        "train-image",
        "worldmodels.gen.image",
        "TrainImageConfig",
        "train an image generator (vae, dcgan, wgan-gp, ddpm) on a rollout store or image folder",
    ),
    Stage(
        "sample",
        "worldmodels.gen.image",
        "SampleImageConfig",
        "write a PNG grid of samples from a train-image checkpoint",
        func="sample_main",
    ),
    Stage(
        "eval",
        "worldmodels.gen.image",
        "EvalImageConfig",
        "Fréchet distance and memorisation of a train-image checkpoint, as one JSON line",
        func="eval_main",
    ),
)

# A pipeline file's `dream` section is not a stage's: it is the dream's settings
# (worldmodels.dream.DreamConfig), read by every stage that dreams (train-controller, fidelity,
# dream-video) unless that stage's own section overrides them.
SHARED_SECTIONS: tuple[str, ...] = ("dream",)

# The pipeline's own top-level settings (worldmodels.pipeline.PipelineConfig's fields besides
# the shared run settings and the sections): a single-stage command reading a pipeline file
# skips them, and refuses any top-level key that is none of these, a section or its own setting.
PIPELINE_SETTINGS: tuple[str, ...] = ("iterations", "controller_draws", "pick_tracks", "baselines")

# The sections of a pipeline file that belong to one stage each, in the table's order.
SECTIONS: tuple[str, ...] = tuple(
    s.section for s in STAGES if s.section is not None and s.section != WHOLE_FILE
)


def stage(name: str) -> Stage:
    """The stage of command `name` (KeyError if there is none)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def stage_of_section(section: str) -> Stage:
    """The stage that reads `section` of a pipeline file (KeyError if none does)."""
    for s in STAGES:
        if s.section == section:
            return s
    raise KeyError(section)
