import os
import sys

from ray import cloudpickle

from rollouts.parallel import ActorPool

# Ray workers cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FlakyWorker:
    """Dies (the whole process) the first time it sees item 3, once per marker file."""

    def __init__(self, marker: str, scale: int):
        self.marker = marker
        self.scale = scale

    def work(self, x: int) -> int:
        if x == 3 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return x * self.scale


def test_a_worker_killed_mid_run_loses_no_item(tmp_path):
    marker = str(tmp_path / "died")
    with ActorPool(FlakyWorker, (marker, 10), n=2) as pool:
        results = sorted(pool.map_unordered("work", range(8)))
    assert os.path.exists(marker)  # a worker really died
    assert results == [(i, 10 * i) for i in range(8)]
