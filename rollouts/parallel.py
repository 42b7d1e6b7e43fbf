"""A pool of Ray actors that survives dying workers.

`ActorPool.map_unordered(method, items)` sends each item to a free actor and yields results as
they finish. When an actor dies (its process crashed or was killed), it is replaced by a fresh one
and its item is sent again, so no item is lost and nothing waits forever on a dead worker; an
item whose worker dies `max_retries + 1` times is an error. Ray is started locally on first use
(one CPU per worker), or `ray_address` connects to an existing cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from gen_core.errors import UserError


def ensure_ray(workers: int, ray_address: str | None) -> bool:
    """Start (or connect to) Ray if it is not running; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private cluster
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    return True


class ActorPool:
    """`n` actors of `cls(*args)`, each using `num_cpus` CPUs."""

    def __init__(
        self,
        cls: type,
        args: tuple = (),
        n: int = 1,
        num_cpus: float = 1,
        ray_address: str | None = None,
        max_retries: int = 3,
    ):
        import ray

        self._ray = ray
        self._started = ensure_ray(n, ray_address)
        try:
            self._remote = ray.remote(num_cpus=num_cpus, max_restarts=0)(cls)
            self._args = args
            self.max_retries = max_retries
            self.actors = [self._remote.remote(*args) for _ in range(n)]
            # Wait until every actor is built, so timings of the work exclude start-up.
            ray.get([a.__ray_ready__.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise

    def map_unordered(self, method: str, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """Yield (item, result) for every item, calling `actor.<method>(item)`."""
        from ray.exceptions import RayActorError, WorkerCrashedError

        ray = self._ray
        queue = list(reversed(list(items)))
        retries: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, Any, int]] = {}  # ref -> (slot, item, item id)
        ids = iter(range(1 << 62))

        def submit(slot: int, item: Any = None, item_id: int | None = None) -> None:
            if item_id is None:
                if not queue:
                    return
                item, item_id = queue.pop(), next(ids)
            ref = getattr(self.actors[slot], method).remote(item)
            in_flight[ref] = (slot, item, item_id)

        for slot in range(len(self.actors)):
            submit(slot)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            slot, item, item_id = in_flight.pop(done[0])
            try:
                result = ray.get(done[0])
            except (RayActorError, WorkerCrashedError) as err:
                retries[item_id] = retries.get(item_id, 0) + 1
                if retries[item_id] > self.max_retries:
                    raise UserError(
                        f"a Ray worker died {self.max_retries + 1} times on the same work item "
                        f"({type(err).__name__}); see the Ray logs"
                    ) from None
                self.actors[slot] = self._remote.remote(*self._args)
                submit(slot, item, item_id)
                continue
            submit(slot)
            yield item, result

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
