"""What every job shares: common settings, the run folder, seeding, device and logging.

Each stage's config inherits `RunConfig`. `start_run(cfg, stage)` makes
`<runs_dir>/<run_name>/<stage>/`, locks it, writes the resolved config there, seeds every RNG,
sets the torch thread count and returns a `Run` holding a logger and a lazily opened TensorBoard
writer.

- **One process per stage folder.** A run holds an exclusive `fcntl.flock` on
  `<stage folder>/.lock` (the holder's pid and command written in it) until `Run.close()` or the
  process's exit; a second process that starts the same stage folder gets a one-line UserError
  naming the holder. A later run of the same folder in the same process (the pipeline) takes
  the lock over.
- **config.yaml says what made the checkpoints.** The resolved config is written when the run
  starts, so a job killed half-way leaves the config it ran with. A run that fails or is refused
  (`end_runs(failed=True)`, called by the `wm` command) in a folder that already held
  checkpoints, before writing one of its own, puts the previous config.yaml back: a refused
  resume (other shapes, another seed) does not leave a config.yaml that made none of them.
  Every checkpoint also keeps the config that made it (`checkpoints/step_*/config.yaml`).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gen_core.config import ConfigError, dump_yaml, setting
from gen_core.errors import UserError
from gen_core.io import atomic_write_text

try:
    import fcntl
except ImportError:  # not POSIX: stage folders are not locked
    fcntl = None

MAX_SEED = 2**32 - 1  # numpy's legacy seed and every RNG here take it; larger ones overflow some
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class RunConfig:
    """Settings every job has."""

    run_name: str = setting("default", "name of the run folder under runs_dir")
    runs_dir: str = setting("runs", "folder holding all runs")
    seed: int = setting(
        0, "seed for every random number generator of the run (0 .. 2**32-1)", min=0, max=MAX_SEED
    )
    device: str = setting(
        "auto", "torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps"
    )
    threads: int = setting(0, "torch CPU threads (0: one per core)", min=0)
    progress: bool = setting(True, "show progress bars")

    def validate(self) -> None:
        if not self.run_name or "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(f"run_name: expected a plain folder name, got {self.run_name!r}")
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(
                f"device: expected auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps, "
                f"got {self.device!r}"
            )

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
    if not _DEVICE_RE.match(name):
        raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name} asked for, but no CUDA device is available")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ConfigError(
                f"device: {name} asked for, but this machine has {n} CUDA device(s): "
                f"cuda:0 .. cuda:{n - 1}"
            )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(
                "device: mps asked for, but no MPS device (Apple GPU) is available; use auto or cpu"
            )
    return device


def set_threads(threads: int) -> None:
    """Torch intra-op threads; 0 means one per available core."""
    import torch

    n = threads or cores()
    torch.set_num_threads(n)


# Runs of this process not yet closed, by stage folder: what `end_runs` finishes, and whose lock a
# later run of the same folder in this process takes over.
_OPEN: dict[Path, Run] = {}


class Run:
    """A run folder with its config, log file and TensorBoard writer, locked while open."""

    def __init__(self, cfg: RunConfig, stage: str, folder: str | None = None):
        self.cfg = cfg
        self.stage = stage  # TensorBoard tags are <stage>/<name> whatever the folder
        self.dir = cfg.run_dir / (folder or stage)
        self._lock: int | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._key = self.dir.resolve()
            self._lock = _take_lock(self.dir, self._key)
            config = self.dir / "config.yaml"
            self._marks = _checkpoint_marks(self.dir)
            held = bool(self._marks) and config.is_file()
            self._previous_config = config.read_text(encoding="utf-8") if held else None
            atomic_write_text(config, dump_yaml(cfg))
            self.log = _make_logger(f"wm.{cfg.run_name}.{self.dir.name}", self.dir / "log.txt")
        except OSError as err:
            self._unlock()
            raise UserError(
                f"runs_dir: cannot write the run folder {self.dir} ({err.strerror or err}); "
                "set runs_dir to a writable folder"
            ) from None
        except BaseException:
            self._unlock()
            raise
        _OPEN[self._key] = self
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
        if _OPEN.get(self._key) is self:
            del _OPEN[self._key]
        self._unlock()

    def fail(self) -> None:
        """Close after the job failed or was refused: if the folder held checkpoints and this run
        wrote none, put back the config.yaml that made them."""
        try:
            if self._previous_config is not None and _checkpoint_marks(self.dir) == self._marks:
                atomic_write_text(self.dir / "config.yaml", self._previous_config)
        except OSError:
            pass
        self.close()

    def _unlock(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing the only descriptor releases the flock


def end_runs(failed: bool = False) -> None:
    """Close every run this process left open (`failed`: as `Run.fail`); called by `wm`."""
    for run in list(_OPEN.values()):
        run.fail() if failed else run.close()


def _checkpoint_marks(folder: Path) -> tuple[str, ...]:
    """The step folders under `<folder>/checkpoints`: they change when a checkpoint is written."""
    ckpt = folder / "checkpoints"
    return tuple(sorted(p.name for p in ckpt.glob("step_*"))) if ckpt.is_dir() else ()


def _holder() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]]
    command = " ".join(argv)
    return f"pid {os.getpid()} ({command[:200]})"


def _take_lock(folder: Path, key: Path) -> int | None:
    """An exclusive flock on `<folder>/.lock` (its descriptor), or UserError naming the holder.

    A run of the same folder that this process left open hands its lock over (no second flock,
    which would conflict with our own)."""
    earlier = _OPEN.pop(key, None)
    if earlier is not None and earlier._lock is not None:
        fd, earlier._lock = earlier._lock, None
    else:
        if fcntl is None:
            return None
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # a file system without flock: run unlocked
                return None
            with open(folder / ".lock", encoding="utf-8", errors="replace") as f:
                holder = f.read().strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{folder} is in use by {holder}; wait for it or use another run_name"
            ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder() + "\n").encode(), 0)
    return fd


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
