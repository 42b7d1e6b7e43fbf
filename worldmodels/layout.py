"""Where everything of a run lives: `RunLayout` names the folders and files under
`<runs_dir>/<run_name>/`, so no stage spells a path of another stage's output.

    store/                      the episode store (wm collect, wm collect-agent)
    collect/, collect_agent/    their logs and resolved configs
    vae/                        V (wm train-vae): checkpoints/, recon.png, samples.png
    encode/                     wm encode's log
    latents/                    the latent store (wm encode)
    m/                          M (wm train-m): checkpoints/
    dream/                      wm dream-video's GIFs
    controller/                 C (wm train-controller): checkpoints/
    m_iterK/, controller_iterK/ round K of World Models' iterative loop (wm pipeline iterations)
    controller_dJ/              draw J >= 1 of C on the same M (wm pipeline controller_draws)
    evaluate/<name>/            wm evaluate: score.json, episode.gif
    fidelity/<name>/            wm fidelity
    pipeline/                   wm pipeline's log and resolved config; draws.json: which draw
                                of C each round kept
    report/                     wm pipeline's report.md, score.json and charts

Every stage folder also holds its config.yaml, log.txt and TensorBoard's tb/ (gen_core.runs).
Round 0 is the first pass (`m`, `controller`); round K >= 1 adds `_iterK` to both folders, and
draw J >= 1 of C adds `_dJ` to the controller's. `controller(k)` without a draw is the draw the
pipeline kept (draws.json; draw 0 where there is none), so every reader of "the run's C"
follows the pipeline's choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gen_core.runs import RunConfig
from rollouts.store import STORE_FOLDER

# M's folder: the one place its name is spelled ("m", rounds "m_iterK").
M_FOLDER = "m"
CONTROLLER_FOLDER = "controller"
ROUND_SUFFIX = "_iter"  # round K >= 1 of the iterative loop: "<folder>_iterK"
DRAW_SUFFIX = "_d"  # draw J >= 1 of C in a round: "<round folder>_dJ"
DRAWS = "draws.json"  # in the pipeline's folder: the draw of C kept in each round
CHECKPOINTS = "checkpoints"  # a training stage's checkpoints, inside its folder
TB = "tb"  # TensorBoard scalars, inside a stage's folder
CONFIG = "config.yaml"  # a stage's resolved config, inside its folder
SCORE = "score.json"  # wm evaluate's and the report's figures


def _round_folder(folder: str, k: int, draw: int = 0) -> str:
    if k < 0 or draw < 0:
        raise ValueError(f"round and draw must be >= 0, got {k}, {draw}")
    name = f"{folder}{ROUND_SUFFIX}{k}" if k else folder
    return f"{name}{DRAW_SUFFIX}{draw}" if draw else name


@dataclass(frozen=True)
class RunLayout:
    """The folders and files of one run, rooted at its run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, cfg: RunConfig) -> RunLayout:
        """The layout of the run a config names (`<runs_dir>/<run_name>`)."""
        return cls(cfg.run_dir)

    # ------------------------------------------------------------------------- data

    @property
    def store(self) -> Path:
        return self.root / STORE_FOLDER

    @property
    def collect(self) -> Path:
        return self.root / "collect"

    @property
    def collect_agent(self) -> Path:
        return self.root / "collect_agent"

    @property
    def latents(self) -> Path:
        return self.root / "latents"

    @property
    def encode(self) -> Path:
        return self.root / "encode"

    # ------------------------------------------------------------------------- models

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def vae_checkpoints(self) -> Path:
        return self.vae / CHECKPOINTS

    def m(self, k: int = 0) -> Path:
        """M's folder of round `k` (0: the first pass)."""
        return self.root / _round_folder(M_FOLDER, k)

    def m_checkpoints(self, k: int = 0) -> Path:
        return self.m(k) / CHECKPOINTS

    def controller(self, k: int = 0, draw: int | None = None) -> Path:
        """C's folder of round `k` (0: the first pass), draw `draw` (None: the kept one)."""
        return self.root / _round_folder(
            CONTROLLER_FOLDER, k, self.kept_draw(k) if draw is None else draw
        )

    def controller_checkpoints(self, k: int = 0, draw: int | None = None) -> Path:
        return self.controller(k, draw) / CHECKPOINTS

    @property
    def draws(self) -> Path:
        """The pipeline's record of the draw of C kept in each round (absent: one draw)."""
        return self.pipeline / DRAWS

    def kept_draw(self, k: int = 0) -> int:
        """The draw of C the pipeline kept in round `k` (0 without a record)."""
        if not self.draws.is_file():
            return 0
        return int(json.loads(self.draws.read_text()).get(str(k), {}).get("kept", 0))

    def last_round(self) -> int:
        """The run's last finished round of the iterative loop (0: none beyond the first pass).

        A round is finished when its controller has checkpoints; its M is `m(k)`. Commands that
        use "the run's controller" (evaluate, fidelity, collect-agent) default to that round.
        """
        prefix = CONTROLLER_FOLDER + ROUND_SUFFIX
        rounds = [
            int(p.parent.name.removeprefix(prefix))
            for p in self.root.glob(f"{prefix}*/{CHECKPOINTS}")
            if p.parent.name.removeprefix(prefix).isdigit()
        ]
        return max(rounds, default=0)

    # ------------------------------------------------------------------------- outputs

    @property
    def dream(self) -> Path:
        """wm dream-video's folder of GIFs."""
        return self.root / "dream"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    def evaluation(self, name: str) -> Path:
        """wm evaluate's output for one policy (`name`: the controller or a baseline)."""
        return self.evaluate / name

    def score(self, name: str) -> Path:
        """score.json of one evaluated policy."""
        return self.evaluation(name) / SCORE

    def episode_gif(self, name: str) -> Path:
        """The GIF of one evaluated policy's first episode."""
        return self.evaluation(name) / "episode.gif"

    @property
    def fidelity(self) -> Path:
        return self.root / "fidelity"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    @property
    def report(self) -> Path:
        """wm pipeline's report: report.md, score.json and the PNG charts."""
        return self.root / "report"
