"""`wm check-data`: read every episode of a store in full and list the bad ones.

A store's episodes are written atomically, but a disk can still fail or a file be copied half;
readers then stop at the first bad file. This reads them all, prints one line per bad episode
and, with `delete_bad`, removes them so that `wm collect` (which only writes missing episodes)
collects them again. Exit status 1 if any episode is bad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gen_core.config import setting
from gen_core.runs import RunConfig
from rollouts.store import STORE_FOLDER, EpisodeStore


@dataclass
class CheckConfig(RunConfig):
    """Settings of `wm check-data`."""

    store: str = setting("", "store folder to check (default: <runs_dir>/<run_name>/store)")
    delete_bad: bool = setting(False, "delete the bad episode files so 'wm collect' redoes them")

    def store_path(self) -> Path:
        return Path(self.store) if self.store else self.run_dir / STORE_FOLDER


def main(cfg: CheckConfig) -> int:
    """Read every episode; print the bad ones (deleting them if asked); 1 if any is bad."""
    store = EpisodeStore(cfg.store_path())
    store.info()
    indices = store.indices()
    total_bytes = sum(store.episode_path(i).stat().st_size for i in indices)
    bad = store.check()
    for path, problem in bad:
        print(f"BAD {path}: {problem}")
        if cfg.delete_bad:
            path.unlink()
    print(
        f"{store.path}: {len(indices)} episodes, {len(bad)} bad, "
        f"{total_bytes / 2**20:.1f} MiB" + (" (bad ones deleted)" if bad and cfg.delete_bad else "")
    )
    return 1 if bad else 0
