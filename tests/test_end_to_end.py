"""The whole chain on tiny settings through `wm pipeline`: collect -> train-vae -> encode ->
train-m -> dream-video -> train-controller (dream) -> evaluate (controller and baselines)."""

import json

import numpy as np
from PIL import Image

from gen_core.checkpoint import load_checkpoint
from rollouts.store import EpisodeStore
from worldmodels.cli import main as wm
from worldmodels.evolve import load_search_history
from worldmodels.latents import LatentStore
from worldmodels.layout import RunLayout
from worldmodels.real_env import eval_seeds

TINY = """
run_name: e2e
seed: 1
progress: false
collect: {episodes: 4, max_steps: 60, backend: inline}
vae: {epochs: 1, batch_size: 32, z_dim: 8, widths: [8, 16, 16, 16]}
m: {epochs: 2, hidden: 16, seq_len: 20, batch_size: 4}
dream: {warmup: 5}
dream_video: {start: 20, steps: 10, scale: 1}
controller: {mode: dream, population: 4, trials: 2, generations: 2, dream_steps: 15,
             start_states: 8, eval_every: 1, eval_trials: 1, max_steps: 30, workers: 1}
evaluate: {episodes: 2, max_steps: 30, workers: 1, gif_steps: 10}
"""


def tiny_config(tmp_path, extra: str = ""):
    """TINY without evaluation GIFs, plus `extra` settings, written to tmp_path/tiny.yaml."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("evaluate: {", "evaluate: {gif: false, ") + extra)
    return cfg


def test_tiny_pipeline_through_the_cli(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    assert wm(["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}"]) == 0
    run = tmp_path / "e2e"

    gif = Image.open(next((run / "dream").glob("*.gif")))
    assert gif.n_frames == 30 and gif.size == (64 * 2 + 2, 64)  # real | context + dream

    ck = load_checkpoint(run / "controller" / "checkpoints")
    assert ck.step == 2 and tuple(ck.model["scored_params"].shape) == ((8 + 16) * 3 + 3,)

    score = json.loads((run / "evaluate" / "controller" / "score.json").read_text())
    assert score["episodes"] == 2 and len(score["returns"]) == 2
    assert np.isclose(score["mean"], np.mean(score["returns"]), atol=0.01)
    gif = Image.open(run / "evaluate" / "controller" / "episode.gif")
    assert gif.size == (96 + 2 + 96, 96)  # the real frame beside V's reconstruction

    report = json.loads((run / "report" / "score.json").read_text())
    for key in (
        "controller_mean",
        "controller_std",
        "random_mean",
        "full_gas_mean",
        "episodes",
        "wall_time_s",
    ):
        assert report[key] is not None, key
    md = (run / "report" / "report.md").read_text()
    assert "full_gas" in md and "cmaes.png" in md and "vae_loss.png" in md
    assert Image.open(run / "report" / "cmaes.png").size == (640, 400)

    # Run again: every stage finds its outputs and the pipeline does no work twice.
    assert wm(["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}", "collect.episodes=4"]) == 0
    assert "nothing to do" in (run / "collect" / "log.txt").read_text()


def test_pipeline_checks_every_section_before_running(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("collect: {episodes: 2}\nm: {hidden: -3}\n")
    assert wm(["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}"]) == 2
    assert "m.hidden: expected a value >= 1" in capsys.readouterr().err
    assert not (tmp_path / "default" / "store").exists()
    # The fidelity section (read by wm fidelity from the same file) is checked too.
    cfg.write_text("collect: {episodes: 2}\nfidelity: {tracks: 0}\n")
    assert wm(["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}"]) == 2
    assert "fidelity.tracks: expected a value >= 2" in capsys.readouterr().err
    assert not (tmp_path / "default" / "store").exists()


def test_real_mode_controller_training_uses_ray_workers(tmp_path):
    cfg = tiny_config(tmp_path)
    assert (
        wm(
            [
                "pipeline",
                "--config",
                str(cfg),
                f"runs_dir={tmp_path}",
                "baselines=false",
                "controller.generations=1",
                "evaluate.episodes=1",
            ]
        )
        == 0
    )
    run = tmp_path / "e2e"
    args = [
        "train-controller",
        f"runs_dir={tmp_path}",
        "run_name=real",
        "progress=false",
        f"vae={run / 'vae'}",
        f"m={run / 'm'}",
        f"store={run / 'store'}",
        "mode=real",
        "population=3",
        "trials=2",
        "generations=2",
        "eval_every=0",
        "max_steps=25",
        "workers=2",
    ]
    assert wm(args) == 0
    ck = load_checkpoint(tmp_path / "real" / "controller" / "checkpoints")
    candidates, returns, _ = load_search_history(tmp_path / "real" / "controller" / "checkpoints")
    assert ck.step == 2 and len(candidates) == 2
    assert returns[0].shape == (3,) and np.all(np.abs(returns[0]) > 0)  # -0.1/frame ...
    log = (tmp_path / "real" / "controller" / "log.txt").read_text()
    assert "mode real" in log and "gen 2/2" in log


def test_pipeline_iterates_and_fidelity_reads_the_run(tmp_path):
    """One round of the iterative loop (collect with the controller, retrain M, evolve C again),
    then `wm fidelity` on the result: dream vs real returns, Spearman, M's open-loop errors."""
    cfg = tiny_config(
        tmp_path, "iterations: 1\ncollect_agent: {episodes: 2, max_steps: 40, backend: inline}\n"
    )
    assert wm(["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}", "baselines=false"]) == 0
    run = tmp_path / "e2e"
    store = EpisodeStore(run / "store")
    labels = sorted(str(ep["policy"]) for _, ep in store.iter_episodes(keys=("policy",)))
    assert labels == ["agent", "agent", "correlated", "correlated", "correlated", "correlated"]
    assert len(LatentStore(run / "latents").indices()) == 6
    assert load_checkpoint(run / "m_iter1" / "checkpoints").step == 2
    assert load_checkpoint(run / "controller_iter1" / "checkpoints").step == 2
    evaluated = (run / "evaluate" / "config.yaml").read_text()
    assert "controller_iter1" in evaluated and "m_iter1" in evaluated
    report = json.loads((run / "report" / "score.json").read_text())
    assert report["iterations"] == 1
    assert RunLayout(run).last_round() == 1  # what evaluate, fidelity, collect-agent default to

    args = [
        "fidelity",
        f"runs_dir={tmp_path}",
        "run_name=e2e",
        "progress=false",
        "tracks=2",
        "horizon=12",
        "start_step=4",
        "dream_samples=2",
        "workers=1",
        "horizons=[1,3]",
        "context=3",
        "policies=[stop,full_gas,left]",
        f"controllers=[{run / 'controller_iter1' / 'checkpoints'}]",
        f"search={run / 'controller_iter1' / 'checkpoints'}",
        "search_per_generation=2",
        "strip=[full_gas]",
        "strip_every=5",
        "strip_dreams=2",
    ]
    assert wm(args) == 0
    out = json.loads((run / "fidelity" / "tau1.15" / "fidelity.json").read_text())
    # 3 fixed and the controller; apart, the best and worst candidate of generations 1 and 2.
    assert out["policies"] == 4 and -1 <= out["spearman"] <= 1
    names = [row["policy"] for row in out["search_table"]]
    assert names == ["g1_r1", "g1_r4", "g2_r1", "g2_r4"]  # population 4
    assert out["search"]["candidates"] == 4 and -1 <= out["search"]["recorded_spearman"] <= 1
    assert Image.open(run / "fidelity" / "tau1.15" / "search.png").size == (640, 480)
    assert "CMA-ES candidates" in (run / "fidelity" / "tau1.15" / "fidelity.md").read_text()
    assert out["real_stop"] == -1.2  # 12 standing steps at -0.1
    assert {"z_mse_1", "z_mse_3", "reward_mae_3"} <= set(out["open_loop"])
    assert Image.open(run / "fidelity" / "tau1.15" / "fidelity.png").size == (640, 480)
    # Steps 0, 5, 10 of full gas: the real row over 2 dreams, tiles of 64 + 2 px.
    assert Image.open(run / "fidelity" / "tau1.15" / "strip.png").size == (3 * 66, 3 * 66 + 8)
    assert "strip.png" in (run / "fidelity" / "tau1.15" / "fidelity.md").read_text()
    assert (tmp_path / "fidelity_real_cache.json").exists()


def test_pipeline_scores_the_controller_anew_when_the_score_on_disk_is_anothers(tmp_path):
    """evaluate records which controller it scored; a score of another controller (e.g. one
    evolved again elsewhere) is not taken for this run's."""
    cfg = tiny_config(tmp_path)
    args = ["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}", "baselines=false"]
    assert wm(args) == 0
    layout = RunLayout(tmp_path / "e2e")
    score = json.loads(layout.score("controller").read_text())
    assert score["controller"] == str(layout.controller_checkpoints())
    assert score["seeds"] == eval_seeds(1, 2)
    layout.score("controller").write_text(json.dumps(score | {"controller": "elsewhere"}))
    assert wm(args) == 0
    rescored = json.loads(layout.score("controller").read_text())
    assert rescored["controller"] == str(layout.controller_checkpoints())
    log = (layout.evaluate / "log.txt").read_text()
    assert log.count("evaluate controller:") == 2  # scored twice: first run and the rerun


def test_pipeline_controller_draws_keep_the_best_on_pick_tracks(tmp_path):
    """controller_draws=2: CMA-ES twice on the same M (seeds 1 and 1001); the round keeps the
    draw whose kept mean scored best on pick tracks of their own, and evaluate scores that one."""
    cfg = tiny_config(tmp_path, "controller_draws: 2\npick_tracks: 2\n")
    assert wm(["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}", "baselines=false"]) == 0
    run = tmp_path / "e2e"
    layout = RunLayout(run)
    assert load_checkpoint(layout.controller_checkpoints(0, 1)).config["seed"] == 1001
    assert load_checkpoint(layout.controller_checkpoints(0, 0)).config["seed"] == 1
    assert not (run / "m_d1").exists()  # one M for both draws
    picks = [
        json.loads(layout.score(f"pick_{n}").read_text()) for n in ("controller", "controller_d1")
    ]
    assert all(p["seeds"] == eval_seeds(1 + 100_000, 2) for p in picks)  # the same pick tracks,
    assert not set(picks[0]["seeds"]) & set(eval_seeds(1, 2))  # not the evaluation's
    record = json.loads(layout.draws.read_text())["0"]
    assert record["kept"] == int(np.argmax([p["mean"] for p in picks]))
    assert record["pick_returns"] == [round(p["mean"], 2) for p in picks]
    score = json.loads(layout.score("controller").read_text())
    assert score["controller"] == str(layout.controller_checkpoints(0, record["kept"]))
    assert f"draw {record['kept']} of 2" in (run / "report" / "report.md").read_text()
    # Choosing between draws needs real checks of each draw's mean: refused in one line.
    bad = ["pipeline", "--config", str(cfg), f"runs_dir={tmp_path}", "controller.eval_in=dream"]
    assert wm(bad) == 2
