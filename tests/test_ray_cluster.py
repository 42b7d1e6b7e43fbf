"""Ray as a real cluster, and Ray processes that outlive their driver.

1. A head and a worker node, each its own processes, on 127.0.0.1 only; `wm collect`,
   `wm train-controller mode=real` and `wm evaluate` run on it with `ray_address`, while the
   worker node is SIGKILLed in the middle of a run: every episode is still there.
2. `kill -9` of a `wm collect` that started a local Ray: none of the processes it started is left
   a few seconds later (rollouts/ray_watchdog.py).

Every process a test starts carries a marker in its environment, so the tests find exactly their
own Ray processes (never another Ray instance on the machine) and kill whatever is left of them on
every exit path; the nodes and drivers also get a signal if the test process itself is killed.
(`ray stop` is never used: it stops every Ray process on the machine, not one cluster.)
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from gen_core.checkpoint import load_checkpoint
from rollouts.store import EpisodeStore
from worldmodels.cli import main as wm
from worldmodels.evolve import load_search_history

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds its processes through /proc"
)

MARK = "WM_TEST_RAY_PROCESS"  # which test started it
NODE = "WM_TEST_RAY_NODE"  # which node (or driver) of a test cluster
RAY = Path(sys.executable).parent / "ray"

# The worker node is started the way `ray start --address` starts one, but with its address
# kept: `ray start` turns 127.0.0.1 into the host's address where multi-node clusters are on
# (the default on Linux), and refuses a worker node where they are off.
WORKER_NODE = """
import signal, sys
from ray._private.node import Node
from ray._private.parameter import RayParams

gcs, temp_dir, agent_port = sys.argv[1:]
params = RayParams(
    node_ip_address="127.0.0.1", gcs_address=gcs, num_cpus=1, temp_dir=temp_dir,
    dashboard_agent_listen_port=int(agent_port), node_manager_port=0, include_log_monitor=False,
)
Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("Ray runtime started", flush=True)
signal.pause()
"""


def on_parent_death(sig: signal.Signals):
    """A `preexec_fn`: the child gets `sig` when this test process dies, even by SIGKILL."""

    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(value: str, node: str | None = None) -> list[int]:
    """Live processes whose environment has MARK=value (and NODE=node, if given)."""
    wanted = [f"{MARK}={value}".encode()] + ([f"{NODE}={node}".encode()] if node else [])
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if all(w in env for w in wanted):
            pids.append(int(name))
    return pids


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_gone(value: str, seconds: float) -> list[int]:
    """Wait until no process is marked `value`; those still alive after `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := marked(value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def ray_env(mark: str, temp_dir: str, node: str = "") -> dict[str, str]:
    return {
        **os.environ,
        MARK: mark,
        NODE: node,
        "RAY_TMPDIR": temp_dir,
        "RAY_AUTH_MODE": "disabled",
        # Where multi-node clusters are off, Ray keeps 127.0.0.1 instead of the host's address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


class Cluster:
    """A head and worker nodes on 127.0.0.1, each node its own process tree and marker."""

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.tag = uuid.uuid4().hex[:12]
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, node: str, cmd: list[str]) -> None:
        log = Path(self.temp_dir) / f"{node}.log"
        with open(log, "wb") as out:
            self.procs[node] = proc = subprocess.Popen(
                cmd,
                env=ray_env(self.tag, self.temp_dir, node),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=on_parent_death(signal.SIGTERM),  # a node shuts itself down
            )
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)

    def start_head(self) -> None:
        # A dead node is noticed after 4 missed checks 0.5 s apart (default: 5 x 3 s).
        checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
        self._start(
            "head",
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                "--num-cpus=1",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                f"--system-config={json.dumps(checks)}",
            ],
        )

    def start_worker(self, node: str) -> None:
        cmd = [sys.executable, "-c", WORKER_NODE, self.address, self.temp_dir, str(free_port())]
        self._start(node, cmd)

    def kill_node(self, node: str) -> list[str]:
        """SIGKILL every process of a worker node (raylet, agents, workers); their commands."""
        pids = marked(self.tag, node)
        names = [cmdline(p) for p in pids]
        kill_all(pids)
        return names

    def stop(self) -> list[int]:
        """Stop every node (SIGTERM: each shuts its processes down), then SIGKILL what is left;
        the processes that needed a SIGKILL."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        left = wait_gone(self.tag, 20)
        kill_all(left)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return left


@pytest.fixture
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="wmray", dir="/tmp")  # short: Ray's sockets live there
    c = Cluster(temp_dir)
    try:
        c.start_head()
        c.start_worker("worker1")
        yield c
    finally:
        c.stop()
        kill_all(marked(c.tag))  # drivers included
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_wm(cluster: Cluster, args: list[str], log: Path) -> subprocess.Popen:
    """A `wm` command as a driver of the cluster (its own process, stdout+stderr in `log`)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worldmodels.cli", *args, f"ray_address={cluster.address}"],
            env=ray_env(cluster.tag, cluster.temp_dir, "driver"),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=on_parent_death(signal.SIGKILL),
        )


def finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    assert rc == 0, f"{proc.args}: {rc}\n{log.read_text()[-3000:]}"


def kill_when(cluster: Cluster, node: str, ready, proc: subprocess.Popen, what: str) -> list[str]:
    """Kill `node` once `ready()` holds while `proc` still runs; the node's commands."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"{what} finished before the worker node was killed"
        assert time.monotonic() < deadline, f"{what}: never got going"
        time.sleep(0.05)
    killed = cluster.kill_node(node)
    assert proc.poll() is None, f"{what} finished before the worker node was killed"
    return killed


def test_a_cluster_losing_its_worker_node_mid_run_loses_no_episode(cluster, tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "runs" / "c" / "store"
    common = [f"runs_dir={runs}", "run_name=c", "progress=false", "seed=3"]

    # 1. Collect with one actor on each node; the worker node dies once an episode is written.
    episodes = 8
    args = ["collect", *common, f"episodes={episodes}", "max_steps=150", "workers=2"]
    proc = start_wm(cluster, args, tmp_path / "collect.log")
    written = lambda: len(list((store / "episodes").glob("ep_*.npz")))  # noqa: E731
    killed = kill_when(cluster, "worker1", lambda: written() >= 1, proc, "collect")
    assert any("ray::EpisodeWorker" in c for c in killed), killed  # it ran an actor ...
    on_disk = written()
    finish(proc, tmp_path / "collect.log")
    assert on_disk < episodes  # ... and was killed while episodes were still to come
    s = EpisodeStore(store)
    assert s.indices() == list(range(episodes))
    assert all(s.load(i)["obs"].shape[1:] == (64, 64, 3) for i in s.indices())

    # 2. A tiny V and M on that store (no Ray).
    vae = ["epochs=1", "batch_size=32", "z_dim=8", "widths=[8,16,16,16]"]
    assert wm(["train-vae", *common, *vae]) == 0
    assert wm(["encode", *common]) == 0
    assert wm(["train-m", *common, "epochs=1", "hidden=16", "seq_len=20", "batch_size=4"]) == 0

    # 3. Evolve C in the real env on a new worker node, killed after the first generation.
    cluster.start_worker("worker2")
    gens, pop = 3, 4
    args = [
        "train-controller",
        *common,
        "mode=real",
        f"population={pop}",
        "trials=2",
        f"generations={gens}",
        "eval_every=0",
        "max_steps=60",
        "workers=2",
    ]
    proc = start_wm(cluster, args, tmp_path / "controller.log")
    log = runs / "c" / "controller" / "log.txt"
    started = lambda: log.exists() and "gen 1/" in log.read_text()  # noqa: E731
    killed = kill_when(cluster, "worker2", started, proc, "train-controller")
    assert any("ray::RealEnvWorker" in c for c in killed), killed
    finish(proc, tmp_path / "controller.log")
    ckpt = runs / "c" / "controller" / "checkpoints"
    candidates, returns, _ = load_search_history(ckpt)
    assert load_checkpoint(ckpt).step == gens and len(returns) == gens
    for r in returns:  # every candidate x trial played (-0.1 a frame at least: never 0)
        assert r.shape == (pop,) and np.all(np.abs(r) > 0)

    # 4. Evaluate on what is left (the head, 1 CPU) with 2 workers asked for.
    proc = start_wm(
        cluster,
        ["evaluate", *common, "episodes=3", "max_steps=40", "workers=2", "gif=false"],
        tmp_path / "evaluate.log",
    )
    finish(proc, tmp_path / "evaluate.log")
    score = json.loads((runs / "c" / "evaluate" / "controller" / "score.json").read_text())
    assert len(score["returns"]) == 3 and all(r != 0 for r in score["returns"])


def test_a_killed_wm_command_leaves_no_ray_process(tmp_path):
    """kill -9 of `wm collect` while its local Ray works: its Ray processes end within seconds
    (without the watchdog, the dashboard and runtime-env agents lingered for a minute)."""
    temp_dir = tempfile.mkdtemp(prefix="wmray", dir="/tmp")
    mark = uuid.uuid4().hex[:12]
    store = tmp_path / "k" / "store" / "episodes"
    args = [f"runs_dir={tmp_path}", "run_name=k", "progress=false", "episodes=40", "workers=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "worldmodels.cli", "collect", *args, "max_steps=300"],
        env=ray_env(mark, temp_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=on_parent_death(signal.SIGKILL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (store.exists() and any(store.glob("ep_*.npz"))):  # mid-run
            assert proc.poll() is None, "wm collect ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = [cmdline(p) for p in marked(mark) if p != proc.pid]
        proc.kill()
        proc.wait()
        assert any("raylet" in c for c in before) and any("ray::" in c for c in before), before
        left = wait_gone(mark, 15)
        assert not left, [cmdline(p) for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(marked(mark))
        shutil.rmtree(temp_dir, ignore_errors=True)
