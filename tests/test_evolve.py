"""The CMA-ES loop (worldmodels/evolve.py): it climbs, resumes exactly after a kill, keeps a
checkpoint whose size does not grow with the generations, and keeps every generation's
candidates, returns and curves in a history of its own."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gen_core.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.errors import UserError
from worldmodels import evolve as evolve_module
from worldmodels.cma_state import cma_state, restore_cma_state, rng_from_tensors
from worldmodels.evolve import ESSettings, _make_es, evolve, load_search_history

REPO = Path(__file__).resolve().parents[1]
TARGET = np.linspace(-1, 1, 6)


def quadratic_returns(candidates, generation):
    return -((candidates - TARGET) ** 2).sum(axis=1)  # best return 0 at TARGET


def settings(generations, population=10, sigma0=0.5, seed=3):
    return ESSettings(population, sigma0, generations, eval_every=5, seed=seed)


def score_mean(params):
    """An eval_fn: the mean parameters' return, and a std of its own."""
    return float(quadratic_returns(params[None], 0)[0]), 0.5


def history_file(ckpt_dir, generation):
    return ckpt_dir / "history" / f"gen_{generation:06d}.npz"


def assert_same_history(a, b):
    (xa, ra, _), (xb, rb, _) = load_search_history(a), load_search_history(b)
    assert len(xa) == len(xb) and len(ra) == len(rb)
    for g, (x, y, r, s) in enumerate(zip(xa, xb, ra, rb)):
        assert np.array_equal(x, y) and np.array_equal(r, s), f"generation {g + 1} differs"


def test_cma_es_loop_climbs_a_quadratic(tmp_path):
    result = evolve(
        6,
        quadratic_returns,
        settings(40),
        tmp_path,
        {},
        show_progress=False,
        eval_fn=score_mean,
    )
    first, last = result.history["best"][0], result.history["best"][-1]
    assert first < -1.0 and last > -1e-3, (first, last)
    np.testing.assert_allclose(result.best_params, TARGET, atol=0.05)
    assert result.history["eval_gen"] == [5, 10, 15, 20, 25, 30, 35, 40]
    ck = load_checkpoint(tmp_path)  # what other code reads from the checkpoint
    for key in ("scored_params", "mean_params", "best_params"):
        assert tuple(ck.model[key].shape) == (6,)
    np.testing.assert_array_equal(ck.model["mean_params"].numpy(), result.mean_params)
    assert ck.state["best_return"] == result.best_return
    assert ck.state["scored_return"] == result.scored_return
    # The curves are in the history files, not in the checkpoint.
    assert "curves" not in ck.state
    for g in range(1, 41):
        with np.load(history_file(tmp_path, g)) as f:
            r = f["returns"]
            assert (
                [float(f[k]) for k in ("best", "mean", "worst")]
                == [
                    result.history["best"][g - 1],
                    result.history["mean"][g - 1],
                    result.history["worst"][g - 1],
                ]
                == [r.max(), r.mean(), r.min()]
            )
            if g % 5:
                assert "eval" not in f.files and "eval_std" not in f.files
            else:
                i = result.history["eval_gen"].index(g)
                assert float(f["eval"]) == result.history["eval"][i]
                assert float(f["eval_std"]) == 0.5
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000039", "step_00000040"]


def test_resume_after_a_kill_gives_the_same_run(tmp_path):
    def run(fitness, ckpt_dir):
        return evolve(
            6, fitness, settings(12), ckpt_dir, {}, eval_fn=score_mean, show_progress=False
        )

    straight = run(quadratic_returns, tmp_path / "a")

    calls = {"n": 0}

    def killed_at_gen_7(candidates, generation):
        if generation == 7:
            raise KeyboardInterrupt  # the job is killed during generation 8
        calls["n"] += 1
        return quadratic_returns(candidates, generation)

    with pytest.raises(KeyboardInterrupt):
        run(killed_at_gen_7, tmp_path / "b")
    assert load_checkpoint(tmp_path / "b").step == 7 and calls["n"] == 7
    resumed = run(quadratic_returns, tmp_path / "b")
    assert resumed.generations == straight.generations == 12
    np.testing.assert_array_equal(resumed.best_params, straight.best_params)
    np.testing.assert_array_equal(resumed.mean_params, straight.mean_params)
    np.testing.assert_array_equal(resumed.scored_params, straight.scored_params)
    assert resumed.scored_return == straight.scored_return
    assert resumed.history == straight.history  # curves rebuilt from the history files
    assert resumed.history["eval_gen"] == [5, 10]
    assert_same_history(tmp_path / "a", tmp_path / "b")


def test_a_generation_rerun_after_a_kill_replaces_its_history_file(tmp_path, monkeypatch):
    """Killed after generation 8's history file was written but before its checkpoint: the
    resume reruns generation 8 and its file is replaced, whatever it held."""
    evolve(6, quadratic_returns, settings(10), tmp_path / "a", {}, show_progress=False)
    save = evolve_module.save_checkpoint

    def killed_saving_gen_8(ckpt_dir, step, *args, **kwargs):
        if step == 8:
            raise KeyboardInterrupt
        return save(ckpt_dir, step, *args, **kwargs)

    monkeypatch.setattr(evolve_module, "save_checkpoint", killed_saving_gen_8)
    with pytest.raises(KeyboardInterrupt):
        evolve(6, quadratic_returns, settings(10), tmp_path / "b", {}, show_progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b").step == 7 and history_file(tmp_path / "b", 8).is_file()
    np.savez(history_file(tmp_path / "b", 8), candidates=np.ones((10, 6)), returns=np.ones(10))
    assert len(load_search_history(tmp_path / "b")[0]) == 7  # up to the checkpoint only
    evolve(6, quadratic_returns, settings(10), tmp_path / "b", {}, show_progress=False)
    assert_same_history(tmp_path / "a", tmp_path / "b")


# Run by the subprocess of the kill -9 test: the quadratic, slowed down so it can be killed.
KILLED_RUN = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_evolve import evolve, quadratic_returns, settings

def slow(candidates, generation):
    time.sleep(0.05)
    return quadratic_returns(candidates, generation)

evolve(6, slow, settings(30), Path(sys.argv[1]), {{}}, show_progress=False)
"""


def test_kill_9_mid_run_then_resume_gives_the_same_run(tmp_path):
    straight = evolve(6, quadratic_returns, settings(30), tmp_path / "a", {}, show_progress=False)
    killed = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(killed)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            latest = latest_checkpoint(killed) if killed.is_dir() else None
            if latest is not None and int(latest.name.split("_")[1]) >= 8:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run wrote no checkpoint in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = load_checkpoint(killed).step
    assert 8 <= step < 30, step  # killed mid-run
    resumed = evolve(6, quadratic_returns, settings(30), killed, {}, show_progress=False)
    assert load_checkpoint(killed).step == 30
    np.testing.assert_array_equal(resumed.mean_params, straight.mean_params)
    np.testing.assert_array_equal(resumed.best_params, straight.best_params)
    assert resumed.history == straight.history
    assert_same_history(tmp_path / "a", killed)


def step_folder_bytes(ckpt_dir):
    return sum(f.stat().st_size for f in latest_checkpoint(ckpt_dir).iterdir())


def test_checkpoint_size_does_not_grow_with_generations(tmp_path):
    """The step folder of a 200-generation run is no larger than that of a 10-generation one
    (the curves are in the history files, counters and RNG states in tensors), and a run killed
    midway and resumed returns the same curves as one that ran straight through."""
    n = 50
    target = np.linspace(-1, 1, n)

    def returns(candidates, generation):
        return -((candidates - target) ** 2).sum(axis=1)

    def score(params):
        return float(returns(params[None], 0)[0]), 0.0

    def run(generations, ckpt, fitness=returns):
        s = ESSettings(8, 0.5, generations, eval_every=5, seed=1)
        return evolve(n, fitness, s, ckpt, {}, eval_fn=score, show_progress=False)

    sizes, results = {}, {}
    for generations in (10, 200):
        ckpt = tmp_path / str(generations)
        results[generations] = run(generations, ckpt)
        sizes[generations] = step_folder_bytes(ckpt)
        assert len(list((ckpt / "history").glob("gen_*.npz"))) == generations
        assert "curves" not in load_checkpoint(ckpt).state
    assert sizes[200] <= sizes[10], sizes

    def killed_at_gen_137(candidates, generation):
        if generation == 137:
            raise KeyboardInterrupt
        return returns(candidates, generation)

    with pytest.raises(KeyboardInterrupt):
        run(200, tmp_path / "resumed", killed_at_gen_137)
    assert load_checkpoint(tmp_path / "resumed").step == 137
    resumed = run(200, tmp_path / "resumed")
    assert resumed.history == results[200].history
    assert len(resumed.history["best"]) == 200 and len(resumed.history["eval"]) == 40
    np.testing.assert_array_equal(resumed.scored_params, results[200].scored_params)
    assert step_folder_bytes(tmp_path / "resumed") == sizes[200]


def plain_ints(v, ints):
    """A `cma_state` entry with its ints in place, as 54a6e29 wrote them."""
    if isinstance(v, dict):
        if set(v) == {"int"}:
            return ints[v["int"]]
        return {k: plain_ints(x, ints) for k, x in v.items()}
    if isinstance(v, list):
        return [plain_ints(x, ints) for x in v]
    return v


def test_a_run_checkpointed_with_its_curves_resumes(tmp_path):
    """54a6e29 kept the curves in the checkpoint, the ints of CMA-ES's state as they are and
    the RNG states as `rng_state()` gives them, and the history files without curves: such a
    run resumes the same, and can be resumed again."""

    def run(generations, ckpt_dir):
        s = settings(generations)
        return evolve(
            6, quadratic_returns, s, ckpt_dir, {}, eval_fn=score_mean, show_progress=False
        )

    straight = run(14, tmp_path / "a")
    old = tmp_path / "b"
    first = run(6, old)
    ck = load_checkpoint(old)
    ints = ck.state["cma"]["ints"].tolist()
    attributes = {k: plain_ints(v, ints) for k, v in ck.state["cma"]["attributes"].items()}
    state = ck.state | {
        "cma": {"buffers": ck.state["cma"]["buffers"], "attributes": attributes},
        "rng": rng_from_tensors(ck.state["rng"]),
        "curves": first.history,
    }
    del state["step"]
    save_checkpoint(old, 6, ck.model, state, ck.config, keep=2)
    for g in range(1, 7):
        with np.load(history_file(old, g)) as f:
            candidates, returns = f["candidates"], f["returns"]
        np.savez(history_file(old, g), candidates=candidates, returns=returns)
    resumed = run(12, old)  # from 54a6e29's checkpoint
    assert resumed.history == {k: v[:12] for k, v in straight.history.items()}
    assert resumed.history["eval_gen"] == [5, 10]
    with np.load(history_file(old, 5)) as f:  # the files got their curves
        assert float(f["eval"]) == first.history["eval"][0] and np.isnan(f["eval_std"])
    resumed = run(14, old)  # from one of its own
    assert resumed.history == straight.history
    np.testing.assert_array_equal(resumed.mean_params, straight.mean_params)
    assert_same_history(tmp_path / "a", old)


@pytest.mark.parametrize("population", [4, 8])  # cma keeps some index sets as ranges at 4
def test_cma_state_restores_every_attribute(tmp_path, population):
    """Through torch.save/torch.load(weights_only=True): the restored strategy's state equals
    the original's, arrays that were one object or shared memory still do, and both go on
    alike."""
    n = 20
    s = settings(0, population=population)
    es = _make_es(n, s)
    for _ in range(15):
        x = np.asarray(es.ask())
        es.tell(list(x), (x**2).sum(axis=1).tolist())
    torch.save(cma_state(es), tmp_path / "cma.pt")
    rng = rng_state()
    restored = _make_es(n, s)  # reseeds numpy's RNG, as a resume does
    restore_cma_state(restored, torch.load(tmp_path / "cma.pt", weights_only=True))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return type(a) is type(b) and a == b

    saved, again = cma_state(es), cma_state(restored)
    assert saved["attributes"].keys() == again["attributes"].keys()
    differ = [k for k, v in saved["attributes"].items() if not same(v, again["attributes"][k])]
    assert not differ and same(saved["buffers"], again["buffers"])
    assert type(restored.sigma) is type(es.sigma) and restored.countiter == 15
    assert restored.C is restored.sm.C and restored.sp0 is restored.sp
    assert np.shares_memory(restored.dC, restored.sm.C)  # dC is a view of C's diagonal
    set_rng_state(rng)
    following = np.asarray(es.ask())
    set_rng_state(rng)
    np.testing.assert_array_equal(np.asarray(restored.ask()), following)


def test_resume_with_other_population_sigma0_or_seed_is_refused(tmp_path):
    evolve(6, quadratic_returns, settings(3, population=8), tmp_path, {}, show_progress=False)
    x0 = settings(6, population=8)
    x0.x0 = np.ones(6)
    others = {
        "population is 8 in the checkpoint but 16": settings(6, population=16),
        "sigma0 is 0.5 in the checkpoint but 0.25": settings(6, population=8, sigma0=0.25),
        "seed is 3 in the checkpoint but 4": settings(6, population=8, seed=4),
        "x0 differs": x0,
    }
    for message, s in others.items():
        with pytest.raises(UserError, match=f"cannot resume, {message}") as err:
            evolve(6, quadratic_returns, s, tmp_path, {}, show_progress=False)
        assert "\n" not in str(err.value)
    assert load_checkpoint(tmp_path).step == 3  # nothing was run
    evolve(6, quadratic_returns, settings(6, population=8), tmp_path, {}, show_progress=False)
    assert load_checkpoint(tmp_path).step == 6  # the same settings resume


def test_search_history_gives_every_candidate_and_its_return(tmp_path):
    seen = []

    def recorded(candidates, generation):
        seen.append((candidates.copy(), quadratic_returns(candidates, generation)))
        return seen[-1][1]

    stage = tmp_path / "controller"
    evolve(6, recorded, settings(3), stage / "checkpoints", {}, show_progress=False)
    candidates, returns, config = load_search_history(stage / "checkpoints")
    assert len(candidates) == len(returns) == 3 and config["n_params"] == 6
    for (x, r), got_x, got_r in zip(seen, candidates, returns):
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_allclose(got_r, r)  # returns, not cma's fitness = -return
    # The same from the step folder and from the run stage.
    for path in (latest_checkpoint(stage / "checkpoints"), stage):
        again, again_returns, _ = load_search_history(path)
        assert all(map(np.array_equal, again, candidates))
        assert all(map(np.array_equal, again_returns, returns))
    # The history is not in the checkpoint.
    ck = load_checkpoint(stage)
    assert "candidates" not in ck.model and "fitness" not in ck.model
    save_checkpoint(tmp_path / "other", 1, {"w": torch.zeros(2)}, {}, {})
    with pytest.raises(UserError, match="not an evolve checkpoint"):
        load_search_history(tmp_path / "other")


def test_missing_history_is_a_one_line_error(tmp_path):
    evolve(6, quadratic_returns, settings(3), tmp_path, {}, show_progress=False)
    history_file(tmp_path, 2).unlink()
    with pytest.raises(UserError, match="gen_000002.npz: search history") as err:
        load_search_history(tmp_path)
    assert "\n" not in str(err.value)
    for f in (tmp_path / "history").iterdir():
        f.unlink()
    (tmp_path / "history").rmdir()
    with pytest.raises(UserError, match="not an evolve checkpoint with a search history"):
        load_search_history(tmp_path)


def test_checkpoint_of_an_older_evolve_still_gives_its_history(tmp_path):
    """Before, the history was in the checkpoint (fitness = -return): it is still read, and a
    resume of such a run is refused in one line."""
    x = [torch.randn(4, 6, dtype=torch.float64) for _ in range(2)]
    f = [torch.randn(4, dtype=torch.float64) for _ in range(2)]
    model = {"candidates": x, "fitness": f, "best_params": torch.zeros(6)}
    save_checkpoint(tmp_path, 2, model, {"rng": rng_state()}, {"n_params": 6})
    candidates, returns, _ = load_search_history(tmp_path)
    assert all(map(np.array_equal, candidates, [t.numpy() for t in x]))
    assert all(map(np.array_equal, returns, [-t.numpy() for t in f]))
    with pytest.raises(UserError, match="older evolve"):
        evolve(6, quadratic_returns, settings(3), tmp_path, {}, show_progress=False)


def test_cma_state_is_plain_data():
    """What the checkpoint keeps of CMA-ES is tensors and plain data (it loads with
    weights_only=True), and an object of a kind it does not know is refused, not skipped."""
    es = _make_es(6, settings(0))
    state = cma_state(es)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    es.unexpected = object()
    with pytest.raises(TypeError, match="cannot save unexpected"):
        cma_state(es)
