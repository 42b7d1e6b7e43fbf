"""`wm pipeline`: the whole chain from one config file, then a report.

collect -> train-vae -> encode -> train-mdnrnn -> dream-video -> train-controller, then
`iterations` rounds of World Models' iterative loop (collect-agent: episodes driven by the latest
controller with exploration, appended to the store -> encode -> train-mdnrnn -> train-controller,
each round in its own mdnrnn_iterK / controller_iterK folders), then evaluate (the last controller
and, as baselines, uniform random actions and constant full gas, on the same tracks). Every stage
resumes from what is on disk, so a finished stage costs nothing and a killed pipeline run again
continues where it stopped. The report (`<run_dir>/report/report.md`) has
PNG curves of the VAE loss, M's loss, CMA-ES returns per generation and the final scores;
`score.json` beside it holds the figures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_core.config import ConfigError, from_dict, setting
from gen_core.io import atomic_write_text
from gen_core.plots import line_chart, read_scalars
from gen_core.runs import RunConfig, start_run

# (section, module, config class, function); imported lazily so a bad config fails fast.
STAGES = [
    ("collect", "rollouts.collect", "CollectConfig", "main"),
    ("vae", "worldmodels.vae", "TrainVAEConfig", "main"),
    ("encode", "worldmodels.vae", "EncodeConfig", "encode_main"),
    ("mdnrnn", "worldmodels.mdnrnn", "TrainMDNRNNConfig", "main"),
    ("dream", "worldmodels.dream_video", "DreamVideoConfig", "main"),
    ("controller", "worldmodels.train_controller", "TrainControllerConfig", "main"),
    ("collect_agent", "worldmodels.iterate", "CollectAgentConfig", "main"),
    ("evaluate", "worldmodels.evaluate", "EvaluateConfig", "main"),
    # Not run by the pipeline: `wm fidelity` and benchmarks/dream_fidelity.py read this section.
    ("fidelity", "worldmodels.fidelity", "FidelityConfig", "main"),
]
BASELINES = {
    "random": {"policy": "uniform"},
    "full_gas": {"policy": "constant", "policy_params": {"action": [0.0, 1.0, 0.0]}},
}


@dataclass
class PipelineConfig(RunConfig):
    """Settings of `wm pipeline`: shared settings plus one section per stage."""

    collect: dict[str, Any] = setting({}, "settings of wm collect")
    vae: dict[str, Any] = setting({}, "settings of wm train-vae")
    encode: dict[str, Any] = setting({}, "settings of wm encode")
    mdnrnn: dict[str, Any] = setting({}, "settings of wm train-mdnrnn")
    dream: dict[str, Any] = setting({}, "settings of wm dream-video")
    controller: dict[str, Any] = setting({}, "settings of wm train-controller")
    collect_agent: dict[str, Any] = setting(
        {}, "settings of wm collect-agent for the iterations; episodes: added per round"
    )
    iterations: int = setting(
        0, "rounds of collect-agent -> encode -> train-mdnrnn -> train-controller", min=0
    )
    evaluate: dict[str, Any] = setting({}, "settings of wm evaluate (the controller and baselines)")
    baselines: bool = setting(True, "also score uniform random actions and constant full gas")
    fidelity: dict[str, Any] = setting(
        {}, "settings of wm fidelity (checked here; the pipeline does not run it)"
    )

    def validate(self) -> None:
        super().validate()
        for section, *_ in STAGES:
            self.stage_config(section)  # every stage's settings are checked before any runs

    def shared(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)}

    def stage_config(self, section: str, **extra: Any):
        import importlib

        _, module, cls_name, _ = next(s for s in STAGES if s[0] == section)
        cls = getattr(importlib.import_module(module), cls_name)
        try:
            return from_dict(cls, {**self.shared(), **getattr(self, section), **extra})
        except ConfigError as err:
            raise ConfigError(f"{section}.{err}") from None


def _last_per_step(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """A resumed run logs some steps twice; keep the last value of each."""
    d = dict(zip(steps, values))
    keys = sorted(d)
    return keys, [d[k] for k in keys]


def write_report(
    cfg: PipelineConfig,
    scores: dict[str, dict],
    wall_time: float,
    mdnrnn_dir: str = "mdnrnn",
    controller_dir: str = "controller",
) -> Path:
    run_dir = cfg.run_dir
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    charts = []

    def chart(name: str, stage: str, tags: dict[str, str], title: str, xlabel: str) -> None:
        scalars = read_scalars(run_dir / stage / "tb")
        series = {
            label: _last_per_step(*scalars[tag]) for label, tag in tags.items() if tag in scalars
        }
        if series:
            line_chart(out / f"{name}.png", series, title=title, xlabel=xlabel)
            charts.append((title, f"{name}.png"))

    chart(
        "vae_loss",
        "vae",
        {"held-out mse/px": "vae/heldout_mse"},
        "V: held-out MSE per pixel",
        "epoch",
    )
    chart(
        "mdnrnn_loss",
        mdnrnn_dir,
        {"train loss": "mdnrnn/train_loss", "held-out NLL/dim": "mdnrnn/heldout_nll"},
        "M: losses per epoch",
        "epoch",
    )
    chart(
        "cmaes",
        controller_dir,
        {
            "best": "controller/return_best",
            "mean": "controller/return_mean",
            "mean params, scored in real env": "controller/return_of_mean_params",
        },
        "C: CMA-ES returns per generation",
        "generation",
    )
    ctrl = scores.get("controller", {})
    summary = {
        "controller_mean": ctrl.get("mean"),
        "controller_std": ctrl.get("std"),
        "random_mean": scores.get("random", {}).get("mean"),
        "random_std": scores.get("random", {}).get("std"),
        "full_gas_mean": scores.get("full_gas", {}).get("mean"),
        "full_gas_std": scores.get("full_gas", {}).get("std"),
        "episodes": ctrl.get("episodes"),
        "max_steps": ctrl.get("max_steps"),
        "wall_time_s": round(wall_time, 1),
        "controller_mode": cfg.stage_config("controller").mode,
        "iterations": cfg.iterations,
    }
    atomic_write_text(out / "score.json", json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# World Models pipeline: {cfg.run_name}",
        "",
        f"Wall time of this invocation: {wall_time / 60:.1f} min. Config: "
        f"`{run_dir}/pipeline/config.yaml`.",
        "",
        "## Real-env scores",
        "",
        "| policy | mean | std | episodes |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['mean']:.1f} | {s['std']:.1f} | {s['episodes']} |")
    lines.append("")
    for title, png in charts:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out


def main(cfg: PipelineConfig) -> int:
    import importlib

    t0 = time.perf_counter()
    run = start_run(cfg, "pipeline", torch_needed=False)
    log = run.log

    def stage(section: str, **extra: Any) -> None:
        log.info(f"pipeline: stage {section}" + (f" {extra}" if extra else ""))
        _, module, _, func = next(s for s in STAGES if s[0] == section)
        getattr(importlib.import_module(module), func)(cfg.stage_config(section, **extra))

    for section in ("collect", "vae", "encode", "mdnrnn", "dream", "controller"):
        stage(section)
    m_dir, c_dir = "mdnrnn", "controller"
    first = cfg.stage_config("collect").episodes
    per_round = cfg.collect_agent.get("episodes", 100)
    for k in range(1, cfg.iterations + 1):
        paths = {
            "mdnrnn": str(cfg.run_dir / m_dir / "checkpoints"),
            "controller": str(cfg.run_dir / c_dir / "checkpoints"),
        }
        stage("collect_agent", episodes=first + k * per_round, **paths)
        stage("encode")
        m_dir, c_dir = f"mdnrnn_iter{k}", f"controller_iter{k}"
        stage("mdnrnn", out_name=m_dir)
        stage("controller", out_name=c_dir, mdnrnn=str(cfg.run_dir / m_dir / "checkpoints"))
    from worldmodels.evaluate import main as evaluate

    scores = {}
    policies = {"controller": {}} | (BASELINES if cfg.baselines else {})
    for name, extra in policies.items():
        if name == "controller":
            extra = {
                "mdnrnn": str(cfg.run_dir / m_dir / "checkpoints"),
                "controller": str(cfg.run_dir / c_dir / "checkpoints"),
            }
        ecfg = cfg.stage_config("evaluate", name=name, **extra)
        score_file = ecfg.run_dir / "evaluate" / name / "score.json"
        if not score_file.exists():
            log.info(f"pipeline: evaluate {name}")
            evaluate(ecfg)
        scores[name] = json.loads(score_file.read_text())
    out = write_report(cfg, scores, time.perf_counter() - t0, m_dir, c_dir)
    log.info(
        f"pipeline: report in {out / 'report.md'}; "
        + ", ".join(f"{k} {v['mean']:.1f} +- {v['std']:.1f}" for k, v in scores.items())
    )
    run.close()
    return 0
