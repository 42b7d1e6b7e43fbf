"""The `wm` command: one subcommand per stage, each `--config FILE.yaml` plus `key=value` overrides.

Every subcommand is a `main(cfg)` function with a config dataclass, listed in the stage registry
(`worldmodels.stages`); this module only builds the parser from it, loads and validates the
config, and turns user mistakes into one line and exit status 2. Stage modules are imported only
when their subcommand runs, so `wm --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from gen_core.errors import UserError
from worldmodels.stages import (
    GEN_STAGES,
    PIPELINE_SETTINGS,
    SECTIONS,
    SHARED_SECTIONS,
    STAGES,
    WHOLE_FILE,
    Stage,
)


def _settings_epilog(stage: Stage) -> str:
    from gen_core.config import describe

    cls, _ = stage.load()
    rows = describe(cls)
    width = max(len(k) + len(d) + 3 for k, d, _ in rows)
    lines = ["settings (key=value; defaults shown):"]
    for key, default, doc in rows:
        head = f"  {key}={default}"
        lines.append(f"{head:<{width + 2}} {doc}")
    return "\n".join(lines)


def _add_command(sub, stage: Stage, argv: list[str]) -> None:
    wants_help = stage.name in argv and ("-h" in argv or "--help" in argv)
    p = sub.add_parser(
        stage.name,
        help=stage.help,
        description=stage.help,
        epilog=_settings_epilog(stage) if wants_help else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings that override the file"
    )
    p.set_defaults(stage=stage)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wm",
        description="worldmodels: agents that learn to play inside their own dreams.",
        epilog="Run 'wm COMMAND --help' for a command's settings.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for stage in STAGES:
        _add_command(sub, stage, argv)
    gen = sub.add_parser(
        "gen",
        help="image and text generation from the core models",
        description="image and text generation from the core models",
        epilog="Run 'wm gen GEN_COMMAND --help' for a command's settings.",
    )
    gen.set_defaults(help_parser=gen)  # `wm gen` alone prints gen's help, not wm's
    gen_sub = gen.add_subparsers(title="gen commands", metavar="GEN_COMMAND")
    for stage in GEN_STAGES:
        _add_command(gen_sub, stage, argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless: never open a window
    prog = "wm"
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not hasattr(args, "stage"):
            getattr(args, "help_parser", parser).print_help()
            return 2
        stage: Stage = args.stage
        prog = f"wm {stage.name}"
        from gen_core.config import load_config
        from gen_core.runs import end_runs

        cls, func = stage.load()
        whole_file = stage.section == WHOLE_FILE
        others = () if whole_file else tuple(s for s in SECTIONS if s != stage.section)
        cfg = load_config(
            cls,
            args.config,
            args.overrides,
            section=None if whole_file else stage.section,
            other_sections=others,
            ignored=() if whole_file else SHARED_SECTIONS + PIPELINE_SETTINGS,
        )
        try:
            result = func(cfg)
        except BaseException:
            end_runs(failed=True)  # unlock; a refused resume keeps the folder's config.yaml
            raise
        end_runs()
        return result if isinstance(result, int) else 0
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
