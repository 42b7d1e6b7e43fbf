"""What every job shares: common settings, the run folder, seeding, device and logging.

Each stage's config inherits `RunConfig`. `start_run(cfg, stage)` makes
`<runs_dir>/<run_name>/<stage>/`, writes the resolved config there, seeds every RNG, sets the
torch thread count and returns a `Run` holding a logger and a lazily opened TensorBoard writer.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gen_core.config import ConfigError, dump_yaml, setting
from gen_core.io import atomic_write_text


@dataclass
class RunConfig:
    """Settings every job has."""

    run_name: str = setting("default", "name of the run folder under runs_dir")
    runs_dir: str = setting("runs", "folder holding all runs")
    seed: int = setting(0, "seed for every random number generator of the run", min=0)
    device: str = setting(
        "auto", "torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N"
    )
    threads: int = setting(0, "torch CPU threads (0: one per core)", min=0)
    progress: bool = setting(True, "show progress bars")

    def validate(self) -> None:
        if not self.run_name or "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(f"run_name: expected a plain folder name, got {self.run_name!r}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def path(self, value: str, default: str) -> Path:
        """`value` as a path if the user set one, else `default` inside the run folder."""
        return Path(value) if value else self.run_dir / default


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy's legacy global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # rollouts can run without torch imported
        return
    torch.manual_seed(seed)


def resolve_device(name: str):
    """`auto` -> CUDA when present, else CPU; anything else is checked to exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} asked for, but no CUDA device is available")
    return device


def set_threads(threads: int) -> None:
    """Torch intra-op threads; 0 means one per available core."""
    import torch

    n = threads or cores()
    torch.set_num_threads(n)


class Run:
    """A run folder with its config, log file and TensorBoard writer."""

    def __init__(self, cfg: RunConfig, stage: str, folder: str | None = None):
        self.cfg = cfg
        self.stage = stage  # TensorBoard tags are <stage>/<name> whatever the folder
        self.dir = cfg.run_dir / (folder or stage)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.yaml", dump_yaml(cfg))
        self.log = _make_logger(f"wm.{cfg.run_name}.{self.dir.name}", self.dir / "log.txt")
        self._tb = None

    @property
    def tb(self):
        """TensorBoard SummaryWriter under `<run>/<stage>/tb`, opened on first use."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"))
        return self._tb

    def scalars(self, step: int, **values: float) -> None:
        """Write scalars to TensorBoard under `<stage>/<name>`."""
        for k, v in values.items():
            self.tb.add_scalar(f"{self.stage}/{k}", float(v), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


def start_run(
    cfg: RunConfig, stage: str, *, torch_needed: bool = True, folder: str | None = None
) -> Run:
    """Make the run folder (`folder`, default the stage's name), write the resolved config, seed
    and configure threads."""
    seed_everything(cfg.seed)
    if torch_needed:
        set_threads(cfg.threads)
    return Run(cfg, stage, folder)


def _make_logger(name: str, path: Path) -> logging.Logger:
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(fh)
    log.addHandler(sh)
    return log


def progress(iterable: Any = None, **kwargs: Any):
    """A tqdm progress bar (stderr), silent when `disable=True` is passed."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)
