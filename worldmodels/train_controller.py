"""`wm train-controller`: evolve C with CMA-ES, in the real env (Ray) or inside M's dream.

mode=real: each candidate x trial is a real episode played by V + M + C in a Ray actor (one per
core, or a cluster via `ray_address`); a worker that dies is replaced and its episodes rerun.
mode=dream: every candidate x trial rollout runs in M's dream as one batch of tensors, started
from real encoded frames (with a warm-up of real steps to fill h), at sampling temperature
`temperature`. Either way the mean parameters are scored every `eval_every` generations (in the
real env by default: pick by real score, never by dream score) and the parameters with the
best such score are kept as the controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gen_core.checkpoint import checkpoint_config
from gen_core.config import setting, to_dict
from gen_core.errors import UserError
from gen_core.runs import RunConfig, cores, resolve_device, start_run
from rollouts.collect import make_env
from rollouts.parallel import ActorPool
from rollouts.policies import make_policy
from worldmodels.agent import WorldModelAgent, load_agent_parts, play_episode
from worldmodels.controller import BatchController, ControllerSpec, controller_obs, squash_actions
from worldmodels.dream import StartStates, dream_returns
from worldmodels.evolve import ESSettings, evolve
from worldmodels.latents import LatentStore


@dataclass
class TrainControllerConfig(RunConfig):
    """Settings of `wm train-controller`."""

    mode: Literal["dream", "real"] = setting("dream", "where candidates are scored")
    out_name: str = setting("controller", "output folder under the run folder (one per iteration)")
    vae: str = setting("", "V checkpoint (default: <run_dir>/vae/checkpoints)")
    mdnrnn: str = setting("", "M checkpoint (default: <run_dir>/mdnrnn/checkpoints)")
    latents: str = setting("", "latent store for dream start states (default: <run_dir>/latents)")
    store: str = setting("", "episode store V was trained on (default: <run_dir>/store)")
    observe_hidden: bool = setting(True, "C sees [z, h] (False: the z-only variant)")
    population: int = setting(64, "CMA-ES population size", min=2)
    sigma0: float = setting(0.1, "CMA-ES initial step size", min=0.0, min_inclusive=False)
    generations: int = setting(100, "generations to evolve", min=1)
    trials: int = setting(16, "rollouts per candidate per generation (its mean return)", min=1)
    eval_every: int = setting(5, "score the mean parameters every this many gens (0: never)", min=0)
    eval_trials: int = setting(8, "episodes scoring the mean parameters", min=1)
    eval_in: Literal["real", "dream"] = setting("real", "where the mean parameters are scored")
    # dream
    temperature: float = setting(1.15, "dream sampling temperature tau", min=0.0)
    dream_steps: int = setting(300, "steps per dream rollout", min=1)
    start_states: int = setting(512, "dream start states drawn from real encoded episodes", min=1)
    warmup: int = setting(10, "real steps M runs over before each dream start", min=0)
    start_context: Literal["warmup", "episode"] = setting(
        "warmup",
        "what fills M's memory at a dream start: the `warmup` real steps before it (from zero "
        "state), or every real step since its episode began, as in a real episode (for M "
        "trained with carry_state, which never saw a zero state mid-episode)",
    )
    max_start: int = setting(0, "latest step after the warm-up a dream may start at", min=0)
    done_threshold: float = setting(0.5, "predicted done probability that ends a dream", min=0.0)
    # real env
    env_id: str = setting("CarRacingFast-v3", "gymnasium env id for real episodes")
    max_steps: int = setting(1000, "steps per real episode", min=1)
    workers: int | None = setting(
        None, "Ray workers for real episodes (default: one per core)", min=1
    )
    ray_address: str | None = setting(None, "existing Ray cluster address (default: local)")

    def n_workers(self) -> int:
        return self.workers or cores()


def episode_seed(seed: int, generation: int, trial: int) -> int:
    """Real-env seed of a trial: the same for every candidate of a generation (fair comparison)."""
    return int(np.random.SeedSequence([seed, generation, trial]).generate_state(1)[0] % 2**31)


class RealEnvWorker:
    """A Ray actor holding one env and a policy: V + M + C when `parts` is given (its
    parameters arrive with each episode), else a built-in rollout policy by name."""

    def __init__(
        self,
        parts: tuple | None,
        env_id: str,
        max_steps: int,
        policy: str = "controller",
        policy_params: dict | None = None,
    ):
        torch.set_num_threads(1)
        self.env = make_env(env_id, max_steps)
        self.max_steps = max_steps
        if parts is not None:
            vae, mdnrnn, spec, frames = parts
            self.policy = WorldModelAgent(vae, mdnrnn, spec, frames)
        else:
            self.policy = make_policy(policy, self.env.action_space, **(policy_params or {}))

    def play(self, item: tuple[int, np.ndarray | None, int]) -> float:
        _, params, seed = item
        if params is not None:
            self.policy.set_params(params)
        total, *_ = play_episode(self.env, self.policy, seed, self.max_steps)
        return total


def real_returns(pool: ActorPool, params: np.ndarray, seeds: list[int]) -> np.ndarray:
    """(P, len(seeds)) real-env returns of every candidate on every seed."""
    items = [(p, params[p], s) for p in range(len(params)) for s in seeds]
    out = np.zeros((len(params), len(seeds)))
    col = {s: j for j, s in enumerate(seeds)}
    for (p, _, s), ret in pool.map_unordered("play", items):
        out[p, col[s]] = ret
    return out


class DreamFitness:
    """Mean dream return of each candidate over `trials` start states shared by all.

    `dtype=torch.bfloat16` runs M's matmuls in bfloat16 (see `dream_returns`); off by default.
    """

    def __init__(
        self,
        mdnrnn,
        start: StartStates,
        spec: ControllerSpec,
        cfg,
        device,
        dtype: torch.dtype = torch.float32,
    ):
        self.m, self.start, self.spec, self.cfg, self.device = mdnrnn, start, spec, cfg, device
        self.dtype = dtype

    def __call__(self, params: np.ndarray, generation: int, trials: int | None = None):
        trials = trials or self.cfg.trials
        P = len(params)
        g = torch.Generator(device=self.device).manual_seed(
            int(np.random.SeedSequence([self.cfg.seed, generation, 7]).generate_state(1)[0])
        )
        starts = torch.randint(0, len(self.start), (trials,), generator=g, device=self.device)
        idx = starts.repeat(P)  # (P * trials,) candidate-major
        ctrl = BatchController(params, self.spec).to(self.device)
        # BatchController's maths with the product turned around, (A, in) @ (in, trials) per
        # candidate: batched matmuls with 3 output columns are several times slower.
        w_t = ctrl.w.transpose(1, 2).contiguous()  # (P, A, in)
        b = ctrl.b.unsqueeze(2)  # (P, A, 1)

        def policy(z, h):
            obs = controller_obs(z, h, self.spec).view(P, trials, -1)  # (P, trials, in)
            raw = torch.baddbmm(b, w_t, obs.transpose(1, 2)).transpose(1, 2)  # (P, trials, A)
            return squash_actions(raw, self.spec.squash).reshape(P * trials, -1)

        returns = dream_returns(
            self.m,
            policy,
            self.start,
            idx,
            self.cfg.dream_steps,
            self.cfg.temperature,
            g,
            self.cfg.done_threshold,
            self.dtype,
        )
        return returns.view(P, trials).mean(dim=1).cpu().numpy()


def main(cfg: TrainControllerConfig) -> int:
    run = start_run(cfg, "controller", folder=cfg.out_name)
    device = resolve_device(cfg.device)
    parts = load_agent_parts(
        cfg.path(cfg.vae, "vae/checkpoints"),
        cfg.path(cfg.mdnrnn, "mdnrnn/checkpoints"),
        cfg.path(cfg.store, "store"),
        cfg.observe_hidden,
    )
    vae, mdnrnn, spec, frames = parts
    run.log.info(
        f"controller: mode {cfg.mode}, {spec.n_params} parameters, population {cfg.population} "
        f"x {cfg.trials} trials, {cfg.generations} generations"
    )

    pool = None
    if cfg.mode == "real" or (cfg.eval_every and cfg.eval_in == "real"):
        pool = ActorPool(
            RealEnvWorker,
            (parts, cfg.env_id, cfg.max_steps),
            n=cfg.n_workers(),
            ray_address=cfg.ray_address,
        )
    dream = None
    if cfg.mode == "dream" or cfg.eval_in == "dream":
        latents = LatentStore(cfg.path(cfg.latents, "latents"))
        episodes = [ep for _, ep in latents.iter_episodes(keys=("mu", "actions"))]
        if not episodes:
            raise UserError(f"{latents.path}: no encoded episodes; run 'wm encode' first")
        m_cfg = checkpoint_config(cfg.path(cfg.mdnrnn, "mdnrnn/checkpoints"))
        if m_cfg.get("carry_state") and cfg.start_context == "warmup":
            # Such an M never saw a zero state mid-episode: a short warm-up starts it off-course.
            run.log.warning(
                "controller: M was trained with carry_state; start_context=episode gives its "
                "dreams the memory it was trained with"
            )
        m = mdnrnn.to(device)
        start = StartStates.from_episodes(
            m, episodes, cfg.start_states, cfg.warmup, cfg.max_start, cfg.seed, cfg.start_context
        ).to(device)
        dream = DreamFitness(m, start, spec, cfg, device)

    def fitness(params: np.ndarray, generation: int) -> np.ndarray:
        if cfg.mode == "dream":
            return dream(params, generation)
        seeds = [episode_seed(cfg.seed, generation, t) for t in range(cfg.trials)]
        return real_returns(pool, params, seeds).mean(axis=1)

    def score_mean(params: np.ndarray) -> tuple[float, float]:
        if cfg.eval_in == "dream":
            r = dream(params[None], 10**6, trials=cfg.eval_trials)
            return float(r[0]), 0.0
        seeds = [episode_seed(cfg.seed + 1, 10**6, t) for t in range(cfg.eval_trials)]
        r = real_returns(pool, params[None], seeds)[0]
        return float(r.mean()), float(r.std())

    try:
        result = evolve(
            spec.n_params,
            fitness,
            ESSettings(cfg.population, cfg.sigma0, cfg.generations, cfg.eval_every, cfg.seed),
            run.dir / "checkpoints",
            to_dict(cfg),
            run=run,
            eval_fn=score_mean if cfg.eval_every else None,
            shape_keys=["observe_hidden"],
            show_progress=cfg.progress,
        )
    finally:
        if pool is not None:
            pool.close()
    run.log.info(
        f"controller: done, best candidate return {result.best_return:.2f}"
        + (
            f", best scored mean {max(result.history['eval']):.2f}"
            if result.history["eval"]
            else ""
        )
    )
    run.close()
    return 0
