"""Ends a local Ray instance whose driver is gone.

`ray.init()` starts a local instance as children of the driver. Ray ties GCS and the raylet to
the driver (they get SIGKILL when it dies), but the raylet's own children outlive it: after a
`kill -9` of a `wm` command, `ray::DashboardAgent` and `ray::RuntimeEnvAgent` stay up for a
minute (they try to report the raylet's death to the GCS, which is gone, with a 60 s timeout).
`rollouts.parallel.ensure_ray` therefore starts this script beside every local instance, in a
session of its own, with the pids of the processes `ray.init()` started. It keeps a list of those
processes and of all their descendants (pid and start time, refreshed every few seconds) and, as
soon as the driver is gone (its end of the stdin pipe closes, or its pid no longer names the same
process), SIGKILLs every one of them still alive; then it exits. A driver that shuts Ray down
itself writes `stop` first and the watchdog exits without touching anything.

Linux only (it reads /proc); standard library only, so it starts in milliseconds.

    python rollouts/ray_watchdog.py DRIVER_PID ROOT_PID [ROOT_PID ...]
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

# How often the list of processes is refreshed while the driver lives: every second while Ray
# starts its processes, then every 5 s (a driver's death is seen at once through the pipe).
POLL_S, SLOW_POLL_S, SLOW_AFTER_S = 1.0, 5.0, 60.0


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process (empty without /proc)."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                table[int(name)] = info
    return table


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # fields 3.. of proc(5): state, ppid, ...
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def start_time(pid: int) -> int | None:
    """Start time of a live process (tells it from a later process given the same pid)."""
    info = _stat(pid)
    return None if info is None else info[1]


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """The processes below `roots` in `table` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def children(pid: int) -> set[int]:
    """The direct children of `pid`."""
    return {p for p, (ppid, _) in process_table().items() if ppid == pid}


class Tracked:
    """Processes known by (pid, start time), with everything started below them."""

    def __init__(self, pids: set[int]):
        self.known: dict[int, int] = {}
        for pid in pids:
            t = start_time(pid)
            if t is not None:
                self.known[pid] = t

    def alive(self, table: dict[int, tuple[int, int]]) -> set[int]:
        return {p for p, t in self.known.items() if p in table and table[p][1] == t}

    def refresh(self) -> dict[int, tuple[int, int]]:
        table = process_table()
        for pid in descendants(self.alive(table), table):
            self.known.setdefault(pid, table[pid][1])
        return table

    def kill(self) -> int:
        """SIGKILL every tracked process still alive (and what it started); how many."""
        killed = 0
        for pid in sorted(self.alive(self.refresh())):
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        return killed


def watch(driver: int, roots: set[int]) -> int:
    driver_start = start_time(driver)
    tracked = Tracked(roots)
    tracked.refresh()
    stdin = sys.stdin.fileno()
    t0 = time.monotonic()
    while True:
        poll = POLL_S if time.monotonic() - t0 < SLOW_AFTER_S else SLOW_POLL_S
        ready, _, _ = select.select([stdin], [], [], poll)
        if ready:
            data = os.read(stdin, 64)
            if data.startswith(b"stop"):
                return 0  # the driver shut Ray down itself
            if not data:
                break  # the driver's end of the pipe closed: it is gone
        if driver_start is None or start_time(driver) != driver_start:
            break
        tracked.refresh()
    # Kill until nothing is left: a raylet may start a worker while the others are killed.
    for _ in range(10):
        if not tracked.kill():
            break
        time.sleep(0.2)
    return 0


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # Ctrl-C in the driver's terminal is for the driver
    driver, *roots = (int(a) for a in argv)
    return watch(driver, set(roots))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
