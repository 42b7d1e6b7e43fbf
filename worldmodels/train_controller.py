"""`wm train-controller`: evolve C with CMA-ES, in the real env (Ray) or inside M's dream.

mode=real: each candidate x trial is a real episode played by V + M + C in a Ray actor (one per
core, or a cluster via `ray_address`); a worker that dies is replaced and its episodes rerun.
mode=dream: every candidate x trial rollout runs in M's dream as one batch of tensors
(`worldmodels/dream.py`, any M), started from real encoded frames after a warm-up of real steps.
Either way the mean parameters are scored every `eval_every` generations (in the real env by
default: pick by real score, never by dream score) and the parameters with the best such score
are kept as the controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gen_core.config import setting, to_dict
from gen_core.runs import RunConfig, cores, resolve_device, start_run
from rollouts.parallel import ActorPool
from worldmodels.agent import load_agent_parts
from worldmodels.controller import BatchController, ControllerSpec, controller_obs, squash_actions
from worldmodels.dream import DreamConfig, DreamStarts, dream_returns
from worldmodels.evolve import ESSettings, evolve
from worldmodels.latents import dream_episodes
from worldmodels.layout import RunLayout
from worldmodels.models import controller_model_spec
from worldmodels.real_env import RealEnvWorker


@dataclass
class TrainControllerConfig(RunConfig):
    """Settings of `wm train-controller`."""

    mode: Literal["dream", "real"] = setting("dream", "where candidates are scored")
    out_name: str = setting("controller", "output folder under the run folder (one per round)")
    vae: str = setting("", "V checkpoint (default: <run_dir>/vae/checkpoints)")
    m: str = setting("", "M checkpoint (default: <run_dir>/m/checkpoints)")
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
    dream: DreamConfig = setting(default_factory=DreamConfig, doc="how M dreams")
    dream_steps: int = setting(300, "steps per dream rollout", min=1)
    start_states: int = setting(512, "dream start states drawn from real encoded episodes", min=1)
    max_start: int = setting(0, "latest step after the warm-up a dream may start at", min=0)
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


def real_returns(pool: ActorPool, params: np.ndarray, seeds: list[int]) -> np.ndarray:
    """(P, len(seeds)) real-env returns of every candidate on every seed."""
    items = [(p, params[p], s) for p in range(len(params)) for s in seeds]
    out = np.zeros((len(params), len(seeds)))
    col = {s: j for j, s in enumerate(seeds)}
    for (p, _, s), ret in pool.map_unordered("play", items):
        out[p, col[s]] = ret
    return out


class DreamFitness:
    """Mean dream return of each candidate over `trials` start states shared by all, every
    candidate x trial rollout advanced together."""

    def __init__(self, model, starts: DreamStarts, spec: ControllerSpec, cfg, device):
        self.m, self.starts, self.spec, self.cfg, self.device = model, starts, spec, cfg, device

    def __call__(self, params: np.ndarray, generation: int, trials: int | None = None):
        trials = trials or self.cfg.trials
        P = len(params)
        g = torch.Generator(device=self.device).manual_seed(
            int(np.random.SeedSequence([self.cfg.seed, generation, 7]).generate_state(1)[0])
        )
        starts = torch.randint(0, len(self.starts), (trials,), generator=g, device=self.device)
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
            self.m, policy, self.starts, idx, self.cfg.dream_steps, self.cfg.dream, g
        )
        return returns.view(P, trials).mean(dim=1).cpu().numpy()


def main(cfg: TrainControllerConfig) -> int:
    run = start_run(cfg, "controller", folder=cfg.out_name)
    layout = RunLayout(cfg.run_dir)
    device = resolve_device(cfg.device)
    parts = load_agent_parts(
        Path(cfg.vae or layout.vae_checkpoints),
        Path(cfg.m or layout.m_checkpoints()),
        Path(cfg.store or layout.store),
        cfg.observe_hidden,
    )
    vae, m, spec, frames = parts
    run.log.info(
        f"controller: mode {cfg.mode}, {spec.n_params} parameters, population {cfg.population} "
        f"x {cfg.trials} trials, {cfg.generations} generations, M {type(m).__name__}"
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
        episodes = dream_episodes(cfg.latents or layout.latents)
        stepper = m.to(device).stepper()
        starts = DreamStarts.from_episodes(
            stepper, episodes, cfg.start_states, cfg.dream.warmup, cfg.max_start, cfg.seed
        ).to(device)
        dream = DreamFitness(stepper, starts, spec, cfg, device)

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
            model_spec=controller_model_spec(spec),
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
