"""The `wm` command: one subcommand per stage, each `--config FILE.yaml` plus `key=value` overrides.

Every subcommand is a `main(cfg)` function with a config dataclass; this module only finds them,
loads and validates the config, and turns user mistakes into one line and exit status 2.
Stage modules are imported only when their subcommand runs, so `wm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from gen_core.errors import UserError


@dataclass(frozen=True)
class Command:
    module: str  # where `main(cfg)` and the config class live
    config: str  # the config class's name in that module
    help: str  # one line for `wm --help`
    section: str = ""  # the section of a pipeline YAML file this stage reads ("*": the whole file)
    func: str = "main"


# Sections of a pipeline file that belong to one stage each.
SECTIONS = (
    "collect",
    "vae",
    "encode",
    "mdnrnn",
    "dream",
    "controller",
    "evaluate",
    "fidelity",
    "collect_agent",
)

COMMANDS: dict[str, Command] = {
    "pipeline": Command(
        "worldmodels.pipeline",
        "PipelineConfig",
        "the whole chain (collect .. evaluate) from one config, skipping finished stages",
        section="*",
    ),
    "collect": Command(
        "rollouts.collect",
        "CollectConfig",
        "collect episodes from a gymnasium pixel env in parallel",
        section="collect",
    ),
    "check-data": Command(
        "rollouts.store",
        "CheckConfig",
        "verify every episode of a rollout store; list bad ones",
        func="check_main",
    ),
    "train-vae": Command(
        "worldmodels.vae",
        "TrainVAEConfig",
        "train the VAE (V) on the frames of a rollout store",
        section="vae",
    ),
    "encode": Command(
        "worldmodels.vae",
        "EncodeConfig",
        "encode every stored episode to VAE latents (mu, logvar per frame)",
        section="encode",
        func="encode_main",
    ),
    "train-mdnrnn": Command(
        "worldmodels.mdnrnn",
        "TrainMDNRNNConfig",
        "train M (MDN-RNN: next latent, reward, episode end) on encoded episodes",
        section="mdnrnn",
    ),
    "dream-video": Command(
        "worldmodels.dream_video",
        "DreamVideoConfig",
        "GIF of a real episode beside M's dream of it (decoded with V)",
        section="dream",
    ),
    "train-controller": Command(
        "worldmodels.train_controller",
        "TrainControllerConfig",
        "evolve C with CMA-ES in the real env (Ray) or inside M's dream",
        section="controller",
    ),
    "evaluate": Command(
        "worldmodels.evaluate",
        "EvaluateConfig",
        "score a controller or a baseline policy over N real-env episodes",
        section="evaluate",
    ),
    "collect-agent": Command(
        "worldmodels.iterate",
        "CollectAgentConfig",
        "add episodes driven by the current controller (with exploration) to the store",
        section="collect_agent",
    ),
    "fidelity": Command(
        "worldmodels.fidelity",
        "FidelityConfig",
        "does the dream rank policies as the real env does? dream vs real returns, M diagnostics",
        section="fidelity",
    ),
}

# `wm gen <name>`: standalone image and text generation from the core models.
GEN_COMMANDS: dict[str, Command] = {
    "train-text": Command(
        "worldmodels.gen.text",
        "TrainTextConfig",
        "train a character- or byte-level Transformer on a text file",
    ),
    "sample-text": Command(
        "worldmodels.gen.text",
        "SampleTextConfig",
        "sample text from a train-text checkpoint",
        func="sample_main",
    ),
    "train-image": Command(
        "worldmodels.gen.image",
        "TrainImageConfig",
        "train an image generator (vae, dcgan, wgan-gp, ddpm) on a rollout store or image folder",
    ),
    "sample": Command(
        "worldmodels.gen.image",
        "SampleImageConfig",
        "write a PNG grid of samples from a train-image checkpoint",
        func="sample_main",
    ),
    "eval": Command(
        "worldmodels.gen.image",
        "EvalImageConfig",
        "Fréchet distance and memorisation of a train-image checkpoint, as one JSON line",
        func="eval_main",
    ),
}


def _load_command(cmd: Command):
    module = importlib.import_module(cmd.module)
    return getattr(module, cmd.config), getattr(module, cmd.func)


def _settings_epilog(cmd: Command) -> str:
    from gen_core.config import describe

    cls, _ = _load_command(cmd)
    rows = describe(cls)
    width = max(len(k) + len(d) + 3 for k, d, _ in rows)
    lines = ["settings (key=value; defaults shown):"]
    for key, default, doc in rows:
        head = f"  {key}={default}"
        lines.append(f"{head:<{width + 2}} {doc}")
    return "\n".join(lines)


def _add_command(sub, name: str, cmd: Command, argv: list[str]) -> None:
    wants_help = name in argv and ("-h" in argv or "--help" in argv)
    p = sub.add_parser(
        name,
        help=cmd.help,
        description=cmd.help,
        epilog=_settings_epilog(cmd) if wants_help else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings that override the file"
    )
    p.set_defaults(command=cmd, command_name=name)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wm",
        description="worldmodels: agents that learn to play inside their own dreams.",
        epilog="Run 'wm COMMAND --help' for a command's settings.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        _add_command(sub, name, cmd, argv)
    if GEN_COMMANDS:
        gen = sub.add_parser("gen", help="image and text generation from the core models")
        gen_sub = gen.add_subparsers(title="gen commands", metavar="GEN_COMMAND")
        for name, cmd in GEN_COMMANDS.items():
            _add_command(gen_sub, name, cmd, argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless: never open a window
    prog = "wm"
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not hasattr(args, "command"):
            parser.print_help()
            return 2
        prog = f"wm {args.command_name}"
        from gen_core.config import load_config

        cls, func = _load_command(args.command)
        section = args.command.section
        whole_file = section == "*"
        others = () if whole_file else tuple(s for s in SECTIONS if s != section)
        cfg = load_config(
            cls,
            args.config,
            args.overrides,
            section=None if whole_file or not section else section,
            other_sections=others,
        )
        result = func(cfg)
        return result if isinstance(result, int) else 0
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
