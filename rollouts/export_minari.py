"""`wm export-minari`: an episode store written as a local Minari dataset (minari_store.py).

Offline-RL code that reads Minari (`minari.load_dataset(dataset_id)`) then reads the run's
episodes; any stage that reads a store reads the dataset back with `store=minari:<dataset_id>`.
Nothing is uploaded or downloaded: the dataset is a folder under `datasets_path`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gen_core.config import ConfigError, setting
from gen_core.runs import RunConfig, progress, start_run
from rollouts.store import STORE_FOLDER, EpisodeStore

# Minari's dataset id, with the version that loading one requires.
DATASET_ID = re.compile(r"([-\w][-\w/]*[-\w]/)?[-\w]+?-v\d+")


@dataclass
class ExportMinariConfig(RunConfig):
    """Settings of `wm export-minari`."""

    store: str = setting("", "episode store to export (default: <runs_dir>/<run_name>/store)")
    dataset_id: str = setting(
        "", "Minari dataset id, (namespace/)name-vN (default: worldmodels/<run_name>-v0)"
    )
    datasets_path: str = setting(
        "", "folder of Minari datasets (default: $MINARI_DATASETS_PATH, else ~/.minari/datasets)"
    )
    jpeg: bool = setting(
        False, "JPEG-encode the frames (Minari's default: ~9x smaller on disk, but lossy)"
    )

    def dataset(self) -> str:
        return self.dataset_id or f"worldmodels/{self.run_name}-v0"

    def validate(self) -> None:
        super().validate()
        if not DATASET_ID.fullmatch(self.dataset()):
            raise ConfigError(
                f"dataset_id: expected (namespace/)name-vN, e.g. worldmodels/carracing-v0, "
                f"got {self.dataset()!r}"
            )


def main(cfg: ExportMinariConfig) -> int:
    from rollouts.minari_store import datasets_root, export_store

    run = start_run(cfg, "export_minari")
    store = EpisodeStore(Path(cfg.store) if cfg.store else cfg.run_dir / STORE_FOLDER)
    store.info()
    dataset_id = cfg.dataset()
    root = datasets_root(cfg.datasets_path)
    bar = progress(total=len(store), desc="export-minari", unit="ep", disable=not cfg.progress)
    try:
        folder = export_store(store, dataset_id, root, cfg.jpeg, bar)
    finally:
        bar.close()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    run.log.info(
        f"export-minari: {len(store)} episodes of {store.path} -> Minari dataset {dataset_id} "
        f"in {folder} ({size / 2**20:.1f} MiB{', JPEG frames' if cfg.jpeg else ''}); read it "
        f"with MINARI_DATASETS_PATH={root} minari.load_dataset({dataset_id!r}) or "
        f"store=minari:{dataset_id}"
    )
    run.close()
    return 0
