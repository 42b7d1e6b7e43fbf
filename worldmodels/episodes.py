"""Episode helpers shared by the training stages: which episodes are held out, and reading
episodes ahead in a background thread.

V (wm train-vae) and M (wm train-m) hold out the same episodes by the same rule, so M's
held-out scores are on episodes V never trained on either.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from gen_core.errors import UserError


def split_episodes(indices: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) episode indices, at least one held out.

    Each episode's side is fixed by a hash of (seed, index) alone, so adding episodes to the
    store later never moves an episode that was held out into training.
    """
    if len(indices) < 2:
        raise UserError(
            f"the store has {len(indices)} episode(s); training needs at least 2 (one is held out)"
        )
    score = {i: np.random.default_rng([seed, i, 7919]).random() for i in indices}
    heldout = [i for i in indices if score[i] < fraction]
    if not heldout:
        heldout = [min(indices, key=score.__getitem__)]
    if len(heldout) == len(indices):
        heldout = heldout[:-1]
    held = set(heldout)
    return [i for i in indices if i not in held], heldout


def prefetch(iterable: Iterable, depth: int) -> Iterator:
    """Iterate `iterable` in a background thread, keeping up to `depth` items ready.

    Decompressing episodes and shuffling frames (zlib and numpy copies, which release the GIL)
    then overlaps the training step. Errors in the thread are raised here; leaving the loop early
    stops the thread.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            put(err)
            return
        put(done)

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
