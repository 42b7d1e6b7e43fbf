"""M told the car's state: the measurement behind "M told the car's state: not a bound either"
(README.md here). A prototype for one question, not a toolkit module: is the ranking's ceiling
set by what V's frames show, or by what M can learn?

CarRacing's exits from the playfield depend on where the car is, which the 64×64 frames show
only as grass once the car has left the road. Here M gets the car's true state: position,
heading, velocity and spin read from Box2D (`pose_features`), recorded by replaying each stored
episode (its track seed and actions; the replay's rewards are checked against the stored ones).
M is the toolkit's MDN-RNN whose LSTM also reads the heading, velocity and spin; the position
goes into an end term; a Markov head (an MLP of z, state and action) gives a Gaussian over the
state's change, sampled at the dream's temperature and fitted further on single transitions.
In the dream the state is M's own: only the start comes from the real env. It rides along as
extra columns of z, so `wm fidelity`'s copying and stepping works unchanged. The real car's
state is privileged information: this was meant as a bound, not a recipe.

    python docs/results/fidelity/pose_oracle.py states --run const
    python docs/results/fidelity/pose_oracle.py train --run const --name pose --seed 0
    python docs/results/fidelity/pose_oracle.py fidelity --run const --name pose -- \\
        fidelity --config configs/carracing_small.yaml run_name=const \\
        mdnrnn=runs/const/mdnrnn_L500/checkpoints name=pose strip=[]

(`fidelity` takes an LSTM M's folder only for what it reads beside the step: its config and V.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformer_m import const_recipe  # beside this file (run as a script)

import rollouts  # noqa: F401  (registers CarRacingFast-v3)
from gen_core.io import atomic_path
from gen_core.mdnrnn import MDNRNN, MDNOutput, MDNRNNConfig, sample_mixture
from rollouts.collect import make_env
from rollouts.store import EpisodeStore
from worldmodels import mdnrnn as W
from worldmodels.dream import DreamStep
from worldmodels.latents import LatentStore

PLAYFIELD = 2000 / 6  # CarRacing's half-width of the playfield, in Box2D units
POSE_DIM = 7


def pose_features(env) -> np.ndarray:
    """The car's state (7,): x, y in playfield half-widths, cos and sin of the heading, velocity
    (x, y) and spin."""
    hull = env.unwrapped.car.hull
    vx, vy = hull.linearVelocity
    return np.array(
        [hull.position[0] / PLAYFIELD, hull.position[1] / PLAYFIELD, np.cos(hull.angle),
         np.sin(hull.angle), vx, vy, hull.angularVelocity],
        dtype=np.float32,
    )  # fmt: skip


def states_path(run: str) -> Path:
    return Path("runs", run, "car_states.npz")


def record_states(args: argparse.Namespace) -> None:
    """Replay every stored episode and keep the car's state before each step and after the last
    (T + 1, 7), as V's latents are kept."""
    store = EpisodeStore(Path("runs", args.run, "store"))
    env = make_env(store.info()["env_id"], 100_000)
    out, worst, t0 = {}, 0.0, time.time()
    for index, ep in store.iter_episodes(keys=("actions", "rewards", "seed")):
        env.reset(seed=int(ep["seed"]))
        poses = [pose_features(env)]
        for action, reward in zip(ep["actions"], ep["rewards"]):
            _, r, _, _, _ = env.step(action)
            worst = max(worst, abs(float(r) - float(reward)))
            poses.append(pose_features(env))
        out[f"ep_{index:06d}"] = np.stack(poses)
    if worst > 1e-3:
        raise SystemExit(f"replay differs from the store: reward off by {worst}")
    with atomic_path(states_path(args.run), suffix=".npz") as tmp:
        np.savez_compressed(tmp, **out)
    print(f"{len(out)} episodes replayed in {time.time() - t0:.0f}s, rewards match to {worst:.1e}")


class PoseM(MDNRNN):
    """MDN-RNN whose LSTM also reads the car's heading, velocity and spin, with a head for the
    state's change and an end term on the car's position.

    The position reaches only the end term, where the playfield's edge is: in the LSTM it could
    tell M which training track it is on (a precaution; not measured on its own)."""

    def __init__(self, config: MDNRNNConfig, stats: dict[str, torch.Tensor]):
        super().__init__(config)
        c = config
        motion = POSE_DIM - 2  # the state without the position
        self.lstm = nn.LSTM(c.z_dim + motion + c.action_dim, c.hidden, batch_first=True)
        self.pose = nn.Sequential(
            nn.Linear(c.z_dim + motion + c.action_dim, 256),
            nn.SiLU(),
            nn.Linear(256, 256),
            nn.SiLU(),
            nn.Linear(256, 2 * POSE_DIM),
        )
        self.edge = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 1))
        for k, v in stats.items():  # input mean / std and step std of the state, (POSE_DIM,)
            self.register_buffer(k, v)

    def _split(self, z_pose):
        z, pose = z_pose.split([self.config.z_dim, POSE_DIM], dim=-1)
        motion = ((pose - self.pose_mean) / self.pose_std)[..., 2:]  # (..., POSE_DIM - 2)
        return z, pose[..., :2], motion

    def _outputs(self, out, state, z, xy, motion, action) -> tuple[MDNOutput, torch.Tensor]:
        heads = self._heads(out, state)
        heads.done_logit = heads.done_logit + self.edge(xy).squeeze(-1)  # (B, T)
        # The state's change from (z, state, action) alone, not from the LSTM: through the LSTM
        # its loss (heavy-tailed at collisions) crowded out z's and the reward's (held-out NLL
        # 1.03 against 0.94), and a Markov model can be fitted on single steps (`fit_pose`).
        return heads, self.pose(torch.cat([z, motion, action], dim=-1))  # (B, T, 2 POSE_DIM)

    def forward(self, z_pose, action, state=None) -> tuple[MDNOutput, torch.Tensor]:
        z, xy, motion = self._split(z_pose)
        out, state = self.lstm(torch.cat([z, motion, action], dim=-1), state)  # (B, T, hidden)
        return self._outputs(out, state, z, xy, motion, action)

    def step(self, z_pose, action, state) -> tuple[MDNOutput, torch.Tensor]:
        z, xy, motion = self._split(z_pose)
        lstm = self.lstm
        h, c = torch.lstm_cell(
            torch.cat([z, motion, action], dim=-1),
            state,
            lstm.weight_ih_l0,
            lstm.weight_hh_l0,
            lstm.bias_ih_l0,
            lstm.bias_hh_l0,
        )  # (B, hidden) each
        heads, params = self._outputs(
            h.unsqueeze(1),
            (h, c),
            *(x.unsqueeze(1) for x in (z, xy, motion, action)),
        )
        return heads, params[:, 0]

    def pose_nll(self, params, pose, pose_next, mask) -> torch.Tensor:
        mean, log_sigma = params.chunk(2, dim=-1)  # (B, T, POSE_DIM) each
        target = (pose_next - pose) / self.pose_step_std
        log_sigma = log_sigma.clamp(min=-7.0)
        nll = 0.5 * ((target - mean) / log_sigma.exp()) ** 2 + log_sigma  # (B, T, POSE_DIM)
        return (nll.mean(-1) * mask).sum() / mask.sum().clamp(min=1.0)

    def next_pose(self, params, pose, temperature, generator) -> torch.Tensor:
        mean, log_sigma = params.chunk(2, dim=-1)  # (B, POSE_DIM) each
        noise = torch.randn(mean.shape, generator=generator)
        delta = mean + log_sigma.clamp(min=-7.0).exp() * temperature**0.5 * noise
        return pose + delta * self.pose_step_std


def with_poses(run: str, store: LatentStore, episodes: list[W.Episode]) -> None:
    """Append each episode's car states to its latents (as exact columns: no sampling noise)."""
    states = np.load(states_path(run), allow_pickle=False)
    for index, ep in zip(store.indices(), episodes):
        pose = states[f"ep_{index:06d}"]  # (T + 1, POSE_DIM)
        ep.mu = np.concatenate([ep.mu, pose], axis=1)
        ep.logvar = np.concatenate([ep.logvar, np.full_like(pose, -40.0)], axis=1)


def model_path(run: str, name: str) -> Path:
    return Path("runs", run, name, "pose_m.pt")


def train(args: argparse.Namespace) -> None:
    """M's recipe of run const's `mdnrnn_L500` (seq_len 500, batch 8, paid ends, Adam 1e-3, 20
    epochs), plus the state's head."""
    torch.manual_seed(args.seed)
    cfg = const_recipe(args.run, args.name, args.seed)
    store = LatentStore(cfg.latents_path())
    episodes = W.load_episodes(store, cfg)
    z_dim = episodes[0].mu.shape[1]
    with_poses(args.run, store, episodes)
    train_eps, held_eps = W.split_latent_episodes(store, episodes, cfg)
    poses = np.concatenate([e.mu[:, z_dim:] for e in train_eps])
    steps = np.concatenate([np.diff(e.mu[:, z_dim:], axis=0) for e in train_eps])
    stats = {
        "pose_mean": torch.from_numpy(poses.mean(0)),
        "pose_std": torch.from_numpy(poses.std(0) + 1e-6),
        "pose_step_std": torch.from_numpy(steps.std(0) + 1e-6),
    }
    m_cfg = cfg.model_config(
        z_dim, episodes[0].actions.shape[1], W.clipped_end_reward(store, cfg.reward_clip)
    )
    model = PoseM(m_cfg, stats)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    held = W.make_chunks(held_eps, cfg.seq_len, np.random.default_rng(args.seed), True, False)
    for epoch in range(args.epochs):
        batches = W.training_batches(train_eps, cfg, np.random.default_rng([args.seed, epoch]))
        model.train()
        t0, loss_sum = time.time(), 0.0
        for b, _ in batches:
            terms = loss_terms(model, b, z_dim)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += terms["loss"].item()
        model.eval()
        with torch.no_grad():
            h = loss_terms(model, held, z_dim)
        print(
            f"epoch {epoch + 1}: train {loss_sum / len(batches):.4f} held-out nll "
            f"{h['nll']:.4f} pose_nll {h['pose_nll']:.4f} reward_mse {h['reward_mse']:.4f} "
            f"done_bce {h['done_bce']:.4f} {time.time() - t0:.0f}s",
            flush=True,
        )
    fit_pose(model, train_eps, held_eps, z_dim, args)
    with atomic_path(model_path(args.run, args.name)) as tmp:
        torch.save({"config": vars(m_cfg), "model": model.state_dict()}, tmp)


def transitions(episodes: list[W.Episode], z_dim: int) -> dict[str, torch.Tensor]:
    """Every step's (z mean, z std, state, action, next state) as rows."""
    cols = {"mu": [], "std": [], "pose": [], "action": [], "pose_next": []}
    for e in episodes:
        cols["mu"].append(e.mu[:-1, :z_dim])
        cols["std"].append(np.exp(0.5 * e.logvar[:-1, :z_dim]))
        cols["pose"].append(e.mu[:-1, z_dim:])
        cols["pose_next"].append(e.mu[1:, z_dim:])
        cols["action"].append(e.actions)
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in cols.items()}


def fit_pose(model: PoseM, train_eps, held_eps, z_dim: int, args) -> None:
    """More steps for the state's head alone, on single transitions in large batches (z drawn
    from V's posterior, as M sees it)."""
    data, held = transitions(train_eps, z_dim), transitions(held_eps, z_dim)
    opt = torch.optim.Adam(model.pose.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(data["mu"])

    def nll(d, rows):
        z = d["mu"][rows] + d["std"][rows] * torch.randn(d["mu"][rows].shape, generator=gen)
        z_pose = torch.cat([z, d["pose"][rows]], dim=-1)
        _, _, motion = model._split(z_pose)
        params = model.pose(torch.cat([z, motion, d["action"][rows]], dim=-1))
        ones = torch.ones(len(z))
        return model.pose_nll(params, d["pose"][rows], d["pose_next"][rows], ones)

    for it in range(args.pose_steps):
        loss = nll(data, torch.randint(n, (1024,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (it + 1) % 1000 == 0:
            with torch.no_grad():
                h = nll(held, torch.arange(len(held["mu"])))
            print(f"pose step {it + 1}: train {loss.item():.4f} held-out {h.item():.4f}")


def loss_terms(model: PoseM, b: dict, z_dim: int) -> dict[str, torch.Tensor]:
    out, pose_params = model(b["z"], b["actions"])
    terms = model.loss(out, b["z_next"][..., :z_dim], b["rewards"], b["done"], b["mask"])
    terms["pose_nll"] = model.pose_nll(
        pose_params, b["z"][..., z_dim:], b["z_next"][..., z_dim:], b["mask"]
    )
    terms["loss"] = terms["loss"] + terms["pose_nll"]
    return terms


def load(args: argparse.Namespace) -> PoseM:
    ck = torch.load(model_path(args.run, args.name), weights_only=True)
    stats = {k: ck["model"][k] for k in ("pose_mean", "pose_std", "pose_step_std")}
    model = PoseM(MDNRNNConfig(**ck["config"]), stats)
    model.load_state_dict(ck["model"])
    return model.eval()


def pose_step(model: PoseM, temperature: float, done_threshold: float = 0.5):
    """The dream's one-step function over z with the state's columns appended."""
    z_dim = model.config.z_dim

    @torch.no_grad()
    def step(z_pose, h, c, action, generator):
        out, pose_params = model.step(z_pose, action, (h, c))
        z_next = sample_mixture(
            out.logit_pi[:, 0], out.mu[:, 0], out.log_sigma[:, 0], temperature, generator
        )  # (B, z_dim)
        pose = model.next_pose(pose_params, z_pose[:, z_dim:], temperature, generator)
        done = torch.sigmoid(out.done_logit[:, 0]) > done_threshold  # (B,)
        reward = out.reward[:, 0] + model.config.done_reward * done
        h, c = out.state
        return DreamStep(torch.cat([z_next, pose], dim=1), h, c, reward, done)

    return step


def run_fidelity(args: argparse.Namespace, model: PoseM) -> None:
    """`wm fidelity` with this M's step, the start's car state appended to V's latents, and M's
    open-loop diagnostics (which read latents without states) left out."""
    import worldmodels.fidelity as fidelity
    from worldmodels.cli import main as wm

    last_pose: list[np.ndarray] = []
    warmup_frames = fidelity.FidelityWorker.warmup_frames

    def frames_and_pose(self, seed):
        frames = warmup_frames(self, seed)
        last_pose[:] = [pose_features(self.env)]  # standing at the start after the warm-up
        return frames

    fidelity.FidelityWorker.warmup_frames = frames_and_pose
    measure = fidelity.measure_fidelity

    def measure_with_pose(step, encode, *a, **kw):
        def encode_with_pose(frames):
            z = encode(frames)  # (W + 1, z_dim)
            pose = torch.from_numpy(last_pose[0]).expand(len(z), -1)
            return torch.cat([z, pose], dim=1)

        return measure(step, encode_with_pose, *a, **kw)

    fidelity.measure_fidelity = measure_with_pose
    fidelity.open_loop_errors = lambda *a, **kw: {}
    fidelity.mdnrnn_step = lambda _, tau, threshold=0.5: pose_step(model, tau, threshold)
    sys.exit(wm(args.rest))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["states", "train", "fidelity"])
    ap.add_argument("--run", default="const")
    ap.add_argument("--name", default="pose")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--pose-steps", type=int, default=5000, help="extra steps of the state's head")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.rest = argv[cut + 1 :]  # after --: the wm fidelity arguments
    torch.set_num_threads(2)
    if args.what == "states":
        return record_states(args)
    if args.what == "train":
        return train(args)
    run_fidelity(args, load(args))


if __name__ == "__main__":
    main()
