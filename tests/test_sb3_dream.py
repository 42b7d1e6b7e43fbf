"""Stable-Baselines3 in the dream (issue 27): the dream env as SB3 takes it, and
examples/sb3_ppo_dream.py training PPO in a tiny run's dream and driving it in the real env."""

import importlib.util
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from test_dream import build, kwargs
from tiny_run import make_tiny_run

from gen_core.mdnrnn import MDNRNN
from rollouts.recording import make_env
from worldmodels.agent import WorldModelAgent, play_episode
from worldmodels.dream import DREAM_ENV_ID
from worldmodels.real_env import eval_seeds

pytest.importorskip("stable_baselines3")
from stable_baselines3.common.env_checker import check_env  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location(
        "sb3_ppo_dream", REPO / "examples/sb3_ppo_dream.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sb3_checks_the_dream_env():
    env = gym.make(DREAM_ENV_ID, **kwargs(build("lstm").stepper(), max_steps=20))
    with pytest.warns(UserWarning, match="symmetric"):  # CarRacing's gas and brake are [0, 1]
        check_env(env.unwrapped)


def test_sb3_vec_env_is_seeded_and_reports_each_episode():
    """make_vec_env's seed fixes the dreams; Monitor's episode statistics are the env's own."""
    s = build("lstm").stepper()

    def run(seed):
        envs = make_vec_env(DREAM_ENV_ID, n_envs=2, seed=seed, env_kwargs=kwargs(s, max_steps=5))
        obs, out, episodes = envs.reset(), [], []
        for _ in range(12):
            obs, r, done, infos = envs.step(np.tile([[0.1, 0.5, 0.0]], (2, 1)).astype(np.float32))
            out.append(obs)
            episodes += [(i["episode"]["r"], i["episode"]["l"]) for i in infos if "episode" in i]
            # SB3's own autoreset: the last observation of an ended dream is kept aside.
            assert all(("terminal_observation" in i) == d for i, d in zip(infos, done))
        return out, episodes

    a, ep_a = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert len(ep_a) == 4 and all(length == 5 for _, length in ep_a)  # 2 dreams x 2 time limits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("runs"))


def test_ppo_learns_in_the_dream_and_drives_the_real_env(tiny_run):
    """PPO runs >= 2,000 dream steps, then acts in CarRacing through V and M's memory."""
    ex = load_example()
    small = ["--n-envs", "4", "--n-steps", "128", "--batch-size", "64", "--n-epochs", "1"]
    args = ex.parse_args(["--run", str(tiny_run), "--timesteps", "2048", "--dream-steps", "30",
                          *small])  # fmt: skip
    model, parts, _ = ex.train(args)
    assert model.num_timesteps >= 2000
    assert len(model.ep_info_buffer) > 0  # dreams ended (time limit) and were counted

    vae, m, spec, _ = parts
    assert isinstance(m, MDNRNN) and spec.in_dim == 4 + 8  # z of V, h of M
    seen = []

    def act(obs):
        seen.append(obs)
        return model.predict(obs, deterministic=True)[0]

    agent = WorldModelAgent(*parts, act=act)
    env = make_env("CarRacingFast-v3", 25)
    total, steps, _, _ = play_episode(env, agent, eval_seeds(0, 1)[0], 25)
    assert steps == 25 and np.isfinite(total)
    seen = np.stack(seen)
    assert seen.shape == (25, 12) and seen.dtype == np.float32
    assert np.all(seen[0, 4:] == 0) and np.abs(seen[1:, 4:]).sum() > 0  # M remembers
    np.testing.assert_allclose(seen[-1, :4], agent.last_z[0].numpy())  # z: V's of the frame
    actions, _ = model.predict(seen, deterministic=True)
    assert actions.shape == (25, 3)
    assert np.all(actions >= [-1, 0, 0]) and np.all(actions <= [1, 1, 1])


def test_example_scores_ppo_beside_the_cmaes_controller(tiny_run, capsys):
    ex = load_example()
    result = ex.main(["--run", str(tiny_run), "--timesteps", "2048", "--n-envs", "4",
                      "--n-steps", "128", "--batch-size", "64", "--n-epochs", "1",
                      "--dream-steps", "30", "--episodes", "2", "--max-steps", "20"])  # fmt: skip
    assert result["timesteps"] >= 2048 and result["episodes"] == 2
    for name in ("ppo", "cmaes"):  # the same two tracks for both
        assert len(result[name]["returns"]) == 2
        assert np.isclose(result[name]["mean"], np.mean(result[name]["returns"]), atol=0.01)
    saved = json.loads((tiny_run / "sb3_ppo" / "score.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (tiny_run / "sb3_ppo" / "ppo.zip").is_file()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["ppo_mean"] == result["ppo"]["mean"] and "cmaes_mean" in line


def test_example_takes_the_controllers_score_from_wm_evaluate_on_the_same_tracks(tiny_run):
    """A score.json of `wm evaluate` on the example's own tracks is read, not played again;
    one on other tracks is not."""
    ex = load_example()
    args = ["--run", str(tiny_run), "--timesteps", "512", "--n-envs", "2", "--n-steps", "128",
            "--batch-size", "64", "--n-epochs", "1", "--dream-steps", "30", "--episodes", "2",
            "--max-steps", "20"]  # fmt: skip
    score = tiny_run / "evaluate" / "controller" / "score.json"
    score.parent.mkdir(parents=True, exist_ok=True)
    known = {"mean": 123.0, "std": 1.0, "returns": [122.0, 124.0], "max_steps": 20}
    try:
        score.write_text(json.dumps(known | {"seeds": eval_seeds(0, 2)}))
        assert ex.main(args)["cmaes"]["mean"] == 123.0
        score.write_text(json.dumps(known | {"seeds": eval_seeds(1, 2)}))
        assert ex.main(args)["cmaes"]["mean"] != 123.0
    finally:  # the run is shared with the other tests of this file
        score.unlink()
