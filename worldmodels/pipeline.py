"""`wm pipeline`: the whole chain from one config file, then a report.

collect -> train-vae -> encode -> train M -> dream-video -> train-controller (`controller_draws`
independent CMA-ES runs on the same M, the one whose kept mean scores best on `pick_tracks` real
tracks of their own kept), then `iterations`
rounds of World Models' iterative loop (collect-agent: episodes driven by the latest controller
with exploration, appended to the store -> encode -> train M -> train-controller, each round in
its own M and controller folders, `worldmodels.layout`), then evaluate (the last controller
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

from gen_core.config import ConfigError, from_dict, merge, setting, to_dict
from gen_core.io import atomic_write_text
from gen_core.plots import line_chart, read_scalars
from gen_core.runs import RunConfig, start_run
from worldmodels.dream import DreamConfig
from worldmodels.layout import CONFIG, TB, RunLayout
from worldmodels.stages import SECTIONS, stage_of_section

DRAW_SEED_STEP = 1000  # draw j of C evolves at seed + 1000 j
PICK_SEED_OFFSET = 100_000  # the draws are compared on the evaluation tracks of this other seed

BASELINES = {
    "random": {"policy": "uniform"},
    "full_gas": {"policy": "constant", "policy_params": {"action": [0.0, 1.0, 0.0]}},
}


def _section(name: str, note: str = ""):
    """A pipeline file's section for one stage: the settings of the command that reads it."""
    return setting({}, f"settings of wm {stage_of_section(name).name}" + note)


@dataclass
class PipelineConfig(RunConfig):
    """Settings of `wm pipeline`: shared settings plus one section per stage."""

    collect: dict[str, Any] = _section("collect")
    vae: dict[str, Any] = _section("vae")
    encode: dict[str, Any] = _section("encode")
    m: dict[str, Any] = _section("m")
    dream: DreamConfig = setting(
        default_factory=DreamConfig,
        doc="how M dreams, for every stage that dreams (train-controller, fidelity, dream-video)",
    )
    dream_video: dict[str, Any] = _section("dream_video")
    controller: dict[str, Any] = _section("controller")
    collect_agent: dict[str, Any] = _section(
        "collect_agent", " for the iterations; episodes: added per round"
    )
    iterations: int = setting(
        0, "rounds of collect-agent -> encode -> train M -> train-controller", min=0
    )
    controller_draws: int = setting(
        1,
        "independent CMA-ES runs of C on the same M per round (seeds seed, seed + 1000, ...); "
        "the round keeps the one whose kept mean scores best on pick_tracks real tracks (its "
        "candidates are still scored only in the dream)",
        min=1,
    )
    pick_tracks: int = setting(
        16,
        "real tracks the draws' kept means are compared on: tracks of their own, not the "
        "checks' and not the evaluation's",
        min=1,
    )
    evaluate: dict[str, Any] = _section("evaluate", " (the controller and baselines)")
    baselines: bool = setting(True, "also score uniform random actions and constant full gas")
    fidelity: dict[str, Any] = _section("fidelity", " (checked here; the pipeline does not run it)")

    def validate(self) -> None:
        super().validate()
        # Every stage's settings are checked before any runs, fidelity's too: `wm fidelity` and
        # benchmarks/dream_fidelity.py read that section of the same file.
        for section in SECTIONS:
            self.stage_config(section)
        c = self.stage_config("controller")
        if self.controller_draws > 1 and not (c.eval_every and c.eval_in == "real"):
            raise ConfigError(
                "controller_draws: each draw keeps the CMA-ES mean its real checks scored best "
                "(controller.eval_every >= 1 and controller.eval_in: real)"
            )

    def shared(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)}

    def stage_config(self, section: str, **extra: Any):
        """The config of the stage that reads `section`: shared settings, the section, `extra`."""
        cls, _ = stage_of_section(section).load()
        shared = self.shared()
        if "dream" in {f.name for f in dataclasses.fields(cls)}:
            shared["dream"] = to_dict(self.dream)  # the stage's own `dream:` overrides it
        try:
            return from_dict(cls, merge(shared, {**getattr(self, section), **extra}))
        except ConfigError as err:
            raise ConfigError(f"{section}.{err}") from None


def score_on_disk(layout: RunLayout, name: str, controller: str | None = None) -> dict | None:
    """The score.json of evaluation `name` if there is one (and, given `controller`, if it
    scored that controller: a score of another one, e.g. one evolved again, is not taken)."""
    path = layout.score(name)
    if not path.exists():
        return None
    score = json.loads(path.read_text())
    return score if controller is None or score.get("controller") == controller else None


def pick_name(layout: RunLayout, k: int, draw: int) -> str:
    """The evaluation name of draw `draw`'s kept mean on the pick tracks of round `k`."""
    return f"pick_{layout.controller(k, draw).name}"


def pick_draw(cfg: PipelineConfig, k: int, m: str, stage, log) -> int:
    """Score the kept mean of every draw of C in round `k` on the same `pick_tracks` real
    tracks (the evaluation tracks of seed + PICK_SEED_OFFSET: no check and no evaluation of
    this run uses them), record the best (layout.draws) and return it."""
    layout = RunLayout.of(cfg)
    picked = []
    for j in range(cfg.controller_draws):
        name = pick_name(layout, k, j)
        ckpt = str(layout.controller_checkpoints(k, j))
        if score_on_disk(layout, name, ckpt) is None:
            stage(
                "evaluate",
                name=name,
                m=m,
                controller=ckpt,
                episodes=cfg.pick_tracks,
                seed=cfg.seed + PICK_SEED_OFFSET,
                gif=False,
            )
        picked.append(float(json.loads(layout.score(name).read_text())["mean"]))
    kept = max(range(len(picked)), key=lambda j: picked[j])
    record = json.loads(layout.draws.read_text()) if layout.draws.is_file() else {}
    record[str(k)] = {"kept": kept, "pick_returns": [round(r, 2) for r in picked]}
    atomic_write_text(layout.draws, json.dumps(record, indent=2) + "\n")
    log.info(
        f"pipeline: round {k} keeps draw {kept} of C (kept means on {cfg.pick_tracks} pick "
        "tracks: " + ", ".join(f"{r:.1f}" for r in picked) + ")"
    )
    return kept


def _last_per_step(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """A resumed run logs some steps twice; keep the last value of each."""
    d = dict(zip(steps, values))
    keys = sorted(d)
    return keys, [d[k] for k in keys]


def write_report(cfg: PipelineConfig, scores: dict[str, dict], wall_time: float, k: int) -> Path:
    """report.md, score.json and PNG charts of V, M and C (M and C of round `k`)."""
    layout = RunLayout.of(cfg)
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    charts = []

    def chart(name: str, folder: Path, tags: dict[str, str], title: str, xlabel: str) -> None:
        scalars = read_scalars(folder / TB)
        series = {
            label: _last_per_step(*scalars[tag]) for label, tag in tags.items() if tag in scalars
        }
        if series:
            line_chart(out / f"{name}.png", series, title=title, xlabel=xlabel)
            charts.append((title, f"{name}.png"))

    chart(
        "vae_loss",
        layout.vae,
        {"held-out mse/px": "vae/heldout_mse"},
        "V: held-out MSE per pixel",
        "epoch",
    )
    chart(
        "m_loss",
        layout.m(k),
        {"train loss": "m/train_loss", "held-out NLL/dim": "m/heldout_nll"},
        "M: losses per epoch",
        "epoch",
    )
    chart(
        "cmaes",
        layout.controller(k),
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
        f"`{layout.pipeline / CONFIG}`.",
        "",
        "## Real-env scores",
        "",
        "| policy | mean | std | episodes |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['mean']:.1f} | {s['std']:.1f} | {s['episodes']} |")
    lines.append("")
    if cfg.controller_draws > 1:
        drawn = json.loads(layout.draws.read_text())[str(k)]
        lines += [
            f"The controller is draw {drawn['kept']} of {cfg.controller_draws} independent "
            f"CMA-ES runs on the same M (seeds seed + {DRAW_SEED_STEP} j); their kept means on "
            f"{cfg.pick_tracks} pick tracks: "
            + ", ".join(f"{r:.1f}" for r in drawn["pick_returns"])
            + ". The CMA-ES chart is the kept draw's.",
            "",
        ]
    for title, png in charts:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out


def main(cfg: PipelineConfig) -> int:
    t0 = time.perf_counter()
    layout = RunLayout.of(cfg)
    run = start_run(cfg, "pipeline", torch_needed=False, folder=layout.pipeline.name)
    log = run.log

    def stage(section: str, **extra: Any) -> None:
        log.info(f"pipeline: stage {section}" + (f" {extra}" if extra else ""))
        _, func = stage_of_section(section).load()
        func(cfg.stage_config(section, **extra))

    # Round 0 is the first pass on the random rollouts; round k >= 1 adds the episodes driven
    # by round k-1's controller and trains M and C again, each in its own folders. Where every
    # stage reads and writes is set here from the layout, not left to each stage's default.
    stage("collect")
    stage("vae")
    stage("encode")
    first = cfg.stage_config("collect").episodes
    per_round = cfg.collect_agent.get("episodes", 100)
    for k in range(cfg.iterations + 1):
        if k:
            stage(
                "collect_agent",
                episodes=first + k * per_round,
                m=str(layout.m_checkpoints(k - 1)),
                controller=str(layout.controller_checkpoints(k - 1)),
            )
            stage("encode")
        m = str(layout.m_checkpoints(k))
        stage("m", out_name=layout.m(k).name)
        if not k:
            stage("dream_video", m=m)
        for j in range(cfg.controller_draws):
            stage(
                "controller",
                out_name=layout.controller(k, j).name,
                m=m,
                seed=cfg.seed + DRAW_SEED_STEP * j,
            )
        if cfg.controller_draws > 1 or layout.kept_draw(k):  # or an earlier run's record
            pick_draw(cfg, k, m, stage, log)

    scores = {}
    policies = {"controller": {}} | (BASELINES if cfg.baselines else {})
    for name, extra in policies.items():
        if name == "controller":
            extra = {
                "m": str(layout.m_checkpoints(cfg.iterations)),
                "controller": str(layout.controller_checkpoints(cfg.iterations)),
            }
        if score_on_disk(layout, name, extra.get("controller")) is None:
            stage("evaluate", name=name, **extra)  # not scored yet, or another controller was
        scores[name] = json.loads(layout.score(name).read_text())
    out = write_report(cfg, scores, time.perf_counter() - t0, cfg.iterations)
    log.info(
        f"pipeline: report in {out / 'report.md'}; "
        + ", ".join(f"{name} {s['mean']:.1f} +- {s['std']:.1f}" for name, s in scores.items())
    )
    run.close()
    return 0
