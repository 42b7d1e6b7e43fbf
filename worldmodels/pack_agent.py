"""`wm pack-agent`: a finished run's V, M and C packed into one small folder, for `wm play`.

    wm pack-agent run=runs/carracing_small        # rebuilds the agent shipped with the package

Writes `agent.pt` (V's and M's weights in fp16, C's 867 parameters as they are) and
`agent.yaml`: what rebuilds the models (`models`: each one's class and config, C's spec, the
frame settings V reads, the env and the dream's temperature) and how they were made (`made`:
the run folder, its seed and pipeline config, the scores its report and evaluation recorded).
Only reads the run: nothing is written into it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from gen_core.checkpoint import checkpoint_config, model_spec
from gen_core.config import setting
from gen_core.errors import UserError
from gen_core.io import atomic_write_bytes, atomic_write_text
from gen_core.runs import RunConfig
from rollouts.store import open_store
from worldmodels.agent import load_driver
from worldmodels.layout import SCORE, RunLayout
from worldmodels.models import PACKED_SPEC, PACKED_WEIGHTS, SHIPPED_AGENT


@dataclass
class PackAgentConfig(RunConfig):
    """Settings of `wm pack-agent`."""

    run: str = setting("", "the pipeline run folder to pack (default: <runs_dir>/<run_name>)")
    out: str = setting("", f"folder to write (default: the package's {SHIPPED_AGENT.name} agent)")
    params: str = setting("auto", "which of C's parameters: scored, mean, best or auto")
    note: str = setting("", "a line for the record in agent.yaml (what the agent can do)")


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _commit() -> str | None:
    """The git commit of this code, if it runs from a clone."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(cfg: PackAgentConfig) -> int:
    layout = RunLayout(Path(cfg.run) if cfg.run else cfg.run_dir)
    out = Path(cfg.out) if cfg.out else SHIPPED_AGENT
    k = layout.last_round()
    controller = layout.controller_checkpoints(k)
    if not controller.is_dir():
        raise UserError(f"run: {layout.root} has no controller ({controller}); finish its pipeline")
    (vae, m, spec, frames), params = load_driver(
        controller, layout.vae_checkpoints, layout.m_checkpoints(k), layout.store, cfg.params
    )

    # V and M in fp16, half the bytes; load_packed_agent casts them back to float32.
    def half(model):
        return {
            k_: v.half() if v.is_floating_point() else v for k_, v in model.state_dict().items()
        }

    # C stays float32, the precision the agent acts in: 867 numbers (3 KB), and fp16 would
    # move every action it takes.
    weights = {"vae": half(vae), "m": half(m), "controller": torch.as_tensor(params).float()}

    pipeline = layout.pipeline / "config.yaml"
    run_config = yaml.safe_load(pipeline.read_text()) if pipeline.is_file() else None
    dream = (run_config or {}).get("dream") or checkpoint_config(controller).get("dream") or {}
    report = _json(layout.report / SCORE)
    evaluation = _json(layout.score("controller"))
    scores = {
        k_: report[k_]
        for k_ in ("controller_mean", "controller_std", "random_mean", "full_gas_mean", "episodes")
        if report and k_ in report
    }
    if not scores and evaluation:
        scores = {"controller_mean": evaluation["mean"], "controller_std": evaluation["std"],
                  "episodes": evaluation["episodes"]}  # fmt: skip
    record = {
        "models": {
            "vae": model_spec(vae),
            "m": model_spec(m),
            "controller": dataclasses.asdict(spec),
            "frames": dataclasses.asdict(frames),
            "env_id": open_store(layout.store).info()["env_id"],
            "temperature": float(dream.get("temperature", 1.15)),
        },
        "made": {
            "command": f"wm pack-agent run={layout.root}",
            "run": str(layout.root),
            "round": k,
            "seed": (run_config or checkpoint_config(controller)).get("seed"),
            "packed_with_commit": _commit(),  # the code that packed it, not the run's
            "scores": scores or "none recorded (run wm evaluate)",
            "wall_time_s": (report or {}).get("wall_time_s"),
            **({"note": cfg.note} if cfg.note else {}),
            "config": run_config or checkpoint_config(controller),
        },
    }
    buf = io.BytesIO()
    torch.save(weights, buf)
    atomic_write_bytes(out / PACKED_WEIGHTS, buf.getvalue())
    atomic_write_text(out / PACKED_SPEC, yaml.safe_dump(record, sort_keys=False))
    size = (out / PACKED_WEIGHTS).stat().st_size
    print(f"pack-agent: {layout.root} (round {k}) -> {out} ({size / 2**20:.1f} MiB)")
    return 0
