"""A pool of Ray actors that survives dying workers and nodes.

`ActorPool.map_unordered(method, items)` sends each item to a free actor and yields results as
they finish. When an actor dies (its process crashed or was killed, or its whole node went away),
its item goes back to the queue for the next free actor and a fresh actor is started in its place,
so no item is lost and nothing waits forever on a dead worker; an item whose worker dies
`max_retries + 1` times is an error. A replacement that cannot be placed (a cluster that lost a
node has fewer CPUs) does not hold anything up: the actors left do the work, and it joins when
it starts.

Ray is started locally on first use (one CPU per worker), or `ray_address` connects
to an existing cluster. A local instance gets a watchdog (`rollouts/ray_watchdog.py`) that ends
its processes if the driver is killed without shutting Ray down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gen_core.errors import UserError
from rollouts import ray_watchdog

_watchdog: subprocess.Popen | None = None


def ensure_ray(workers: int, ray_address: str | None) -> bool:
    """Start (or connect to) Ray if it is not running; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private cluster
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
        return True
    before = ray_watchdog.children(os.getpid())
    # address="local": a new instance even where `ray start` or RAY_ADDRESS names another one.
    ray.init(
        address="local",
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
    )
    _start_watchdog(ray_watchdog.children(os.getpid()) - before)
    return True


def shutdown_ray() -> None:
    """Shut down the Ray instance this process started, and its watchdog."""
    import ray

    try:
        ray.shutdown()
    finally:
        _stop_watchdog()


def _start_watchdog(ray_pids: set[int]) -> None:
    global _watchdog
    _stop_watchdog()
    if not ray_pids:  # no /proc (not Linux): nothing to watch with
        return
    script = Path(ray_watchdog.__file__)
    cmd = [sys.executable, "-I", str(script), str(os.getpid()), *map(str, sorted(ray_pids))]
    try:
        _watchdog = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives a kill of the driver's process group
        )
    except OSError:
        _watchdog = None


def _stop_watchdog() -> None:
    global _watchdog
    if _watchdog is None:
        return
    try:
        _watchdog.stdin.write(b"stop\n")
        _watchdog.stdin.close()
        _watchdog.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        _watchdog.kill()
    _watchdog = None


def _lost_errors() -> tuple[type[BaseException], ...]:
    """What a call raises when its worker, its node or its result went away."""
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

    return RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError


class ActorPool:
    """`n` actors of `cls(*args)`, each using `num_cpus` CPUs.

    `start_timeout`: seconds to wait for an actor when none is working (a cluster with no CPU
    free for even one), after which `map_unordered` gives up with one line.
    """

    def __init__(
        self,
        cls: type,
        args: tuple = (),
        n: int = 1,
        num_cpus: float = 1,
        ray_address: str | None = None,
        max_retries: int = 3,
        start_timeout: float = 600.0,
    ):
        import ray

        self._ray = ray
        self._started = ensure_ray(n, ray_address)
        self._local = self._started and not ray_address
        try:
            self._remote = ray.remote(num_cpus=num_cpus, max_restarts=0)(cls)
            self._args = args
            self.num_cpus = num_cpus
            self.max_retries = max_retries
            self.start_timeout = start_timeout
            self.actors: list[Any] = [None] * n
            self._ready: set[int] = set()  # slots whose actor is built
            self._starting: dict[Any, int] = {}  # ready ref -> slot
            self._start_failures = [0] * n
            for slot in range(n):
                self._start(slot)
            self._wait_until_built()
        except BaseException:
            self.close()
            raise

    def _start(self, slot: int) -> None:
        self.actors[slot] = self._remote.remote(*self._args)
        self._starting[self.actors[slot].__ray_ready__.remote()] = slot

    def _replace(self, slot: int) -> None:
        """Start a fresh actor in `slot` (its actor died)."""
        self._ready.discard(slot)
        try:
            self._ray.kill(self.actors[slot], no_restart=True)
        except Exception:
            pass
        self._start(slot)

    def _built(self, ref: Any) -> int | None:
        """The slot of a finished ready ref if its actor was built, else None (started again)."""
        slot = self._starting.pop(ref)
        try:
            self._ray.get(ref)
        except _lost_errors() as err:
            if getattr(err, "actor_init_failed", False):
                raise  # the constructor raised: starting it again would not help
            self._start_failures[slot] += 1
            if self._start_failures[slot] > self.max_retries:
                raise UserError(
                    f"a Ray worker died {self.max_retries + 1} times while starting "
                    f"({type(err).__name__}); see the Ray logs"
                ) from None
            self._start(slot)
            return None
        self._start_failures[slot] = 0
        self._ready.add(slot)
        return slot

    def _wait_until_built(self) -> None:
        """Wait for every actor, so timings of the work exclude start-up. On a cluster, where
        there may be too few free CPUs for all, go on with those built once no other has come up
        for as long as the first took (at least 2 s); the others join when they start."""
        ray = self._ray
        t0 = time.monotonic()
        first_took = last_built = None
        while self._starting:
            now = time.monotonic()
            if not self._ready and now - t0 > self.start_timeout:
                raise self._no_worker()
            if self._ready and not self._local and now - last_built > max(2.0, first_took):
                return
            done, _ = ray.wait(list(self._starting), num_returns=1, timeout=1.0)
            for ref in done:
                if self._built(ref) is not None:
                    last_built = time.monotonic()
                    first_took = first_took or last_built - t0

    def _no_worker(self) -> UserError:
        return UserError(
            f"no Ray worker started in {self.start_timeout:.0f}s: does the cluster have "
            f"{self.num_cpus:g} CPU free?"
        )

    def map_unordered(self, method: str, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """Yield (item, result) for every item, calling `actor.<method>(item)`."""
        ray = self._ray
        lost = _lost_errors()
        queue = deque(enumerate(items))  # (item id, item); items to rerun go to the front
        retries: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (slot, item id, item)
        idle = sorted(self._ready, reverse=True)
        waiting_since = time.monotonic()
        while queue or in_flight:
            while queue and idle:
                slot = idle.pop()
                item_id, item = queue.popleft()
                in_flight[getattr(self.actors[slot], method).remote(item)] = (slot, item_id, item)
            if not in_flight:  # work to do, but every actor is (re)starting
                if not self._starting:
                    raise UserError("the Ray actor pool is empty (closed?)")
                left = waiting_since + self.start_timeout - time.monotonic()
                if left <= 0:
                    raise self._no_worker()
                done, _ = ray.wait(list(self._starting), num_returns=1, timeout=left)
            else:
                done, _ = ray.wait(list(in_flight) + list(self._starting), num_returns=1)
            if not done:
                continue
            ref = done[0]
            if ref in self._starting:
                slot = self._built(ref)
                if slot is not None:
                    idle.append(slot)
                continue
            slot, item_id, item = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except lost as err:
                retries[item_id] = retries.get(item_id, 0) + 1
                if retries[item_id] > self.max_retries:
                    raise UserError(
                        f"a Ray worker died {self.max_retries + 1} times on the same work item "
                        f"({type(err).__name__}); see the Ray logs"
                    ) from None
                self._replace(slot)
                queue.appendleft((item_id, item))
                if not in_flight:
                    waiting_since = time.monotonic()
                continue
            idle.append(slot)
            waiting_since = time.monotonic()
            yield item, result

    def close(self) -> None:
        if self._started:
            shutdown_ray()
            self._started = False
        elif getattr(self, "actors", None):  # on a cluster: free its CPUs now
            for actor in self.actors:
                try:
                    self._ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        self.actors = []
        self._starting = {}

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
