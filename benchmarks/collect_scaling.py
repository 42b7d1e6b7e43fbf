"""Collection throughput with 1 and 2 Ray workers, through the real `wm collect` code path.

Each configuration collects the same episodes (same seeds) into a fresh store; timing starts once
the workers' envs are built and ends when the last episode is on disk. Prints one JSON line last:
fps_1, fps_2, their ratio (target >= 1.7 on 2 cores) and the store's bytes per frame.

    python benchmarks/collect_scaling.py [--episodes 16] [--steps 300] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from gen_core.config import from_dict  # noqa: E402
from rollouts.collect import CollectConfig  # noqa: E402
from rollouts.recording import collect  # noqa: E402


def run_once(root: str, name: str, workers: int, episodes: int, steps: int):
    cfg = from_dict(
        CollectConfig,
        {
            "runs_dir": root,
            "run_name": name,
            "episodes": episodes,
            "max_steps": steps,
            "workers": workers,
            "backend": "ray",
            "progress": False,
            "seed": 0,
        },
    )
    return collect(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    fps = {1: [], 2: []}
    bytes_per_frame = []
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):
            for workers in (1, 2):  # alternate to spread machine noise over both
                stats = run_once(root, f"w{workers}_r{r}", workers, args.episodes, args.steps)
                fps[workers].append(stats.frames_per_s)
                bytes_per_frame.append(stats.bytes_per_frame)
                print(
                    f"workers={workers} repeat={r}: {stats.frames} frames, "
                    f"{stats.frames_per_s:.0f} frames/s, {stats.bytes_per_frame:.0f} B/frame"
                )
    fps_1, fps_2 = statistics.median(fps[1]), statistics.median(fps[2])
    result = {
        "name": "collect_scaling",
        "fps_1": round(fps_1, 1),
        "fps_2": round(fps_2, 1),
        "ratio": round(fps_2 / fps_1, 3),
        "bytes_per_frame": round(statistics.mean(bytes_per_frame), 1),
        "raw_bytes_per_frame": 64 * 64 * 3,
        "episodes": args.episodes,
        "steps_per_episode": args.steps,
        "repeats": args.repeats,
        "units": "stored frames per second (median over repeats); ratio = fps_2 / fps_1",
        "cores": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
