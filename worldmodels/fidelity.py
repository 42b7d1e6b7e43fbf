"""`wm fidelity`: does the dream rank policies as the real env does?

A dream is worth training in exactly as far as it tells a good policy from a bad one
(../shared/notes/dream-transfer.md). This module measures that, for a set of policies — fixed
ones (stop, constant gas levels, steering, braking, random and correlated random actions) and any
controller checkpoints — by running each for the same `horizon` steps from the same situations:

- real: on `tracks` tracks (seeds never used in training), after `start_step` steps of a fixed
  warm-up action (CarRacing's first ~50 frames are its zoom-in), the policy drives `horizon` steps;
  its return over those steps is recorded, and whether the episode ended (terminated, e.g.
  CarRacing's -100 for leaving the playfield) within them.
- dream: V encodes the real warm-up frames of the same tracks, M reads the last `dream.warmup`
  of them, as every dream starts (`worldmodels/dream.py`), and the dream starts from there; each
  start is dreamed `dream_samples` times at the dream's temperature; the predicted rewards are
  summed over `horizon` steps, and the fraction of those dreams that M ends within them is
  recorded.

Reported per policy: dream and real mean return, their gap (dream - real), and dream and real end
rates (how often the policy's episode ends within the horizon: a dream that misses those ends, or
invents them, gets the returns wrong whatever its per-step rewards); over policies: the Spearman
rank correlation (and Pearson) of the mean returns. Plus M's multi-step diagnostics on held-out
real episodes: open-loop error of z, reward and done at several horizons under the episode's own
actions, against persistence; and how much M's predicted reward responds to the action.

Everything is written as library functions over M's one-step protocol (`gen_core/mdn.py`), so
the MDN-RNN, the Transformer M or a toy model with known answers (the tests) plug in alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_core.checkpoint import checkpoint_config
from gen_core.config import setting
from gen_core.errors import UserError
from gen_core.io import atomic_path, atomic_write_text
from gen_core.mdn import StepModel
from gen_core.plots import scatter_chart
from gen_core.runs import RunConfig, cores, progress, start_run
from rollouts.policies import CorrelatedRandomPolicy, make_policy
from worldmodels.dream import DreamConfig, DreamStarts, dream_rollouts
from worldmodels.layout import RunLayout
from worldmodels.video import framed

FIDELITY_SEED_BASE = 2_000_000  # fidelity tracks overlap neither training nor evaluation seeds

# Built-in fixed policies: name -> (kind, constant action on CarRacing's [steer, gas, brake]).
FIXED_POLICIES: dict[str, tuple[str, tuple[float, float, float] | None]] = {
    "stop": ("constant", (0.0, 0.0, 0.0)),
    "gas_0.2": ("constant", (0.0, 0.2, 0.0)),
    "gas_0.5": ("constant", (0.0, 0.5, 0.0)),
    "full_gas": ("constant", (0.0, 1.0, 0.0)),
    "left": ("constant", (-1.0, 0.3, 0.0)),
    "right": ("constant", (1.0, 0.3, 0.0)),
    "brake": ("constant", (0.0, 0.0, 0.8)),
    "random": ("uniform", None),
    "correlated": ("correlated", None),
}


@dataclass
class PolicySpec:
    """One policy compared in the dream and the real env."""

    name: str
    kind: str  # constant | uniform | correlated | controller
    action: tuple[float, ...] | None = None  # constant policies
    params: np.ndarray | None = None  # controllers: flat linear-controller parameters
    spec: Any = None  # controllers: their ControllerSpec


def fixed_policy(name: str) -> PolicySpec:
    if name not in FIXED_POLICIES:
        raise UserError(
            f"policies: unknown policy {name!r}; expected some of {', '.join(FIXED_POLICIES)}"
        )
    kind, action = FIXED_POLICIES[name]
    return PolicySpec(name, kind, action)


# ---------------------------------------------------------------------------------- statistics


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side does not vary (no information to rank by)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-12 else 0.0


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties averaged); 0.0 when either side is constant."""
    return pearson(_ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64)))


def pick_candidates(
    returns: Sequence[np.ndarray], generations: Sequence[int], per_generation: int
) -> list[tuple[int, int, int]]:
    """(generation, rank, index) of CMA-ES candidates to compare: in each generation (counted
    from 1; none given: four spread from the first to the last), `per_generation` candidates
    at evenly spaced ranks of the return they were selected by, rank 1 the best."""
    n_gen = len(returns)
    if not n_gen:
        raise UserError("search: the checkpoint holds no generations")
    gens = list(generations) or sorted({int(g) for g in np.linspace(1, n_gen, 4).round()})
    bad = [g for g in gens if not 1 <= g <= n_gen]
    if bad:
        raise UserError(f"search_generations: {bad} outside the checkpoint's 1..{n_gen}")
    picks = []
    for g in gens:
        order = np.argsort(-np.asarray(returns[g - 1]), kind="stable")  # best first
        size = len(order)
        for r in sorted({int(r) for r in np.linspace(0, size - 1, min(per_generation, size))}):
            picks.append((g, r + 1, int(order[r])))
    return picks


def search_agreement(
    generations: Sequence[int],
    recorded: Sequence[float],
    dream: Sequence[float],
    real: Sequence[float],
) -> dict[str, Any]:
    """How well dreams rank CMA-ES candidates as the real env does.

    recorded: each candidate's return when CMA-ES selected it (its own dream starts and
    length); dream / real: its mean return in this measure's dreams and real tracks.
    Returns the Spearman of both dream figures against the real one over all candidates, and
    the mean within-generation Spearman of the recorded one (what CMA-ES's selection acts on).
    """
    gens = np.asarray(generations)
    rec, real = np.asarray(recorded, float), np.asarray(real, float)
    within = [
        spearman(rec[gens == g], real[gens == g]) for g in np.unique(gens) if (gens == g).sum() >= 3
    ]
    within = [w for w in within if not math.isnan(w)]
    return {
        "candidates": len(rec),
        "spearman": round(spearman(dream, real), 3),
        "recorded_spearman": round(spearman(rec, real), 3),
        "within_generation": round(float(np.mean(within)), 3) if within else None,
    }


@dataclass
class FidelityResult:
    """Dream vs real returns (and end rates) per policy, and how well the dream ranks them."""

    names: list[str]
    dream: np.ndarray  # (P, tracks) dream return per start (mean over dream samples)
    real: np.ndarray  # (P, tracks) real return per track
    extra: dict[str, Any] = field(default_factory=dict)
    dream_ended: np.ndarray | None = None  # (P, tracks) fraction of a start's dreams that ended
    real_ended: np.ndarray | None = None  # (P, tracks) 1.0 where the real episode ended

    def _end_rates(self) -> dict[str, np.ndarray]:
        """Per-policy end rates (P,) of the sides that were measured, keyed dream / real."""
        sides = {"dream": self.dream_ended, "real": self.real_ended}
        return {k: np.asarray(v).mean(axis=1) for k, v in sides.items() if v is not None}

    @property
    def dream_mean(self) -> np.ndarray:
        return self.dream.mean(axis=1)

    @property
    def real_mean(self) -> np.ndarray:
        return self.real.mean(axis=1)

    @property
    def gap(self) -> np.ndarray:
        return self.dream_mean - self.real_mean

    @property
    def spearman(self) -> float:
        return spearman(self.dream_mean, self.real_mean)

    @property
    def pearson(self) -> float:
        return pearson(self.dream_mean, self.real_mean)

    def spearman_interval(
        self, level: float = 0.9, resamples: int = 1000, seed: int = 0
    ) -> tuple[float, float]:
        """Bootstrap interval of the Spearman over tracks: the tracks are drawn again with
        replacement and both sides' means recomputed. With policies whose returns lie close
        together a few tracks (or dreams) reorder them, and one figure hides that."""
        rng = np.random.default_rng(seed)
        n = self.dream.shape[1]
        rhos = []
        for _ in range(resamples):
            pick = rng.integers(0, n, n)  # (tracks,)
            rhos.append(spearman(self.dream[:, pick].mean(1), self.real[:, pick].mean(1)))
        lo, hi = np.quantile(rhos, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)

    @cached_property
    def spearman_90(self) -> tuple[float, float]:
        """The default 90% interval, drawn once for the summary and the markdown."""
        return self.spearman_interval()

    def split(self, first: int) -> tuple[FidelityResult, FidelityResult]:
        """(the first `first` policies, with `extra`; the rest, without)."""

        def part(rows: slice, extra: dict[str, Any]) -> FidelityResult:
            def cut(a):
                return None if a is None else np.asarray(a)[rows]

            return FidelityResult(
                self.names[rows],
                self.dream[rows],
                self.real[rows],
                extra,
                cut(self.dream_ended),
                cut(self.real_ended),
            )

        return part(slice(0, first), self.extra), part(slice(first, None), {})

    def table(self) -> list[dict[str, Any]]:
        ends = self._end_rates()
        rows = []
        for i, n in enumerate(self.names):
            row = {
                "policy": n,
                "dream_mean": round(float(self.dream[i].mean()), 2),
                "dream_std": round(float(self.dream[i].std()), 2),
                "real_mean": round(float(self.real[i].mean()), 2),
                "real_std": round(float(self.real[i].std()), 2),
                "gap": round(float(self.gap[i]), 2),
            }
            for side, rate in ends.items():
                row[f"{side}_end_rate"] = round(float(rate[i]), 3)
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spearman": round(self.spearman, 3),
            "spearman_90": [round(x, 3) for x in self.spearman_90],
            "pearson": round(self.pearson, 3),
            "policies": len(self.names),
            "mean_abs_gap": round(float(np.abs(self.gap).mean()), 2),
        }
        ends = self._end_rates()
        for i, n in enumerate(self.names):
            out[f"dream_{n}"] = round(float(self.dream_mean[i]), 2)
            out[f"real_{n}"] = round(float(self.real_mean[i]), 2)
            for side, rate in ends.items():
                out[f"{side}_end_{n}"] = round(float(rate[i]), 3)
        out.update(self.extra)
        return out

    def markdown(self) -> str:
        sides = list(self._end_rates())
        header = "| policy | dream mean ± std | real mean ± std | dream − real |"
        header += "".join(f" {side} ends |" for side in sides)
        lines = [header, "| --- " * (4 + len(sides)) + "|"]
        for row in self.table():
            ends = "".join(f" {row[f'{side}_end_rate']:.0%} |" for side in sides)
            lines.append(
                f"| {row['policy']} | {row['dream_mean']:.1f} ± {row['dream_std']:.1f} | "
                f"{row['real_mean']:.1f} ± {row['real_std']:.1f} | {row['gap']:+.1f} |{ends}"
            )
        lines.append("")
        lo, hi = self.spearman_90
        lines.append(
            f"Spearman {self.spearman:.3f} (90% bootstrap interval over tracks {lo:.2f} to "
            f"{hi:.2f}), Pearson {self.pearson:.3f} over {len(self.names)} policies."
        )
        search = self.extra.get("search")
        if search:
            lines.append(
                f"\nCMA-ES candidates ({search['candidates']}): Spearman against the real "
                f"returns {search['spearman']:.3f} for these dreams, "
                f"{search['recorded_spearman']:.3f} for the return CMA-ES selected them by; "
                f"within a generation {search['within_generation']}."
            )
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- real side


def real_policy(p: PolicySpec, action_space, agent_factory: Callable | None = None):
    """A numpy `obs -> action` policy (with `reset(seed)`) for the real env."""
    if p.kind == "constant":
        return make_policy("constant", action_space, action=list(p.action))
    if p.kind in ("uniform", "correlated"):
        return make_policy(p.kind, action_space)
    if p.kind == "controller":
        if agent_factory is None:
            raise UserError(f"policy {p.name}: a controller needs V and M to run in the real env")
        agent = agent_factory()
        agent.set_params(p.params)
        return agent
    raise UserError(f"policy {p.name}: unknown kind {p.kind!r}")


def play_from_warmup(
    env,
    policy,
    seed: int,
    warmup: int,
    warmup_action: np.ndarray,
    horizon: int,
    keep_all: bool = False,
) -> tuple[float, bool, list[np.ndarray]]:
    """Warm up with a fixed action (or, given `warmup_action` of shape (warmup, A), with those
    actions in turn), then let `policy` drive `horizon` steps.

    Returns the return over the policy's steps, whether the env terminated the episode within
    them (a time-limit truncation is not an end: the dream has no time limit to foresee), and the
    warm-up observations (warmup + 1 frames, the last being the one the policy first sees; with
    `keep_all`, every frame the policy saw after it as well). A policy with
    `observe(obs, action)` (the World Models agent) sees the warm-up frames too, so its M state
    matches the dream's start.
    """
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset(seed)
    frames = [obs]
    actions = np.broadcast_to(warmup_action, (warmup, warmup_action.shape[-1]))
    for a in actions:
        if hasattr(policy, "observe"):
            policy.observe(obs, a)
        obs, _, terminated, truncated, _ = env.step(a)
        frames.append(obs)
        if terminated or truncated:
            raise UserError(f"track {seed}: the episode ended during the {warmup}-step warm-up")
    total, ended = 0.0, False
    for _ in range(horizon):
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += float(reward)
        if keep_all:
            frames.append(obs)
        if terminated or truncated:
            ended = bool(terminated)
            break
    return total, ended, frames


class FidelityWorker:
    """Plays policies on real tracks (a Ray actor, or inline)."""

    def __init__(
        self,
        env_fn: Callable[[], Any],
        warmup: int,
        warmup_action: Sequence[float],
        horizon: int,
        agent_factory: Callable | None = None,
        single_thread: bool = False,
    ):
        if single_thread:  # one per Ray actor; an inline worker leaves the caller's threads alone
            torch.set_num_threads(1)
        self.env = env_fn()
        self.warmup, self.horizon = warmup, horizon
        self.warmup_action = np.asarray(warmup_action, dtype=np.float32)
        self.agent_factory = agent_factory

    def play(self, item: tuple[int, PolicySpec, int]) -> tuple[float, bool]:
        """(return, ended) of one policy on one track."""
        _, p, seed = item
        policy = real_policy(p, self.env.action_space, self.agent_factory)
        ret, ended, _ = play_from_warmup(
            self.env, policy, seed, self.warmup, self.warmup_action, self.horizon
        )
        return ret, ended

    def warmup_frames(self, seed: int) -> list[np.ndarray]:
        policy = make_policy("constant", self.env.action_space, action=list(self.warmup_action))
        _, _, frames = play_from_warmup(self.env, policy, seed, self.warmup, self.warmup_action, 0)
        return frames


def real_returns(
    worker_args: tuple,
    policies: Sequence[PolicySpec],
    seeds: Sequence[int],
    workers: int = 1,
    ray_address: str | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(P, tracks) real returns and ends (1.0 where the episode terminated within the horizon);
    in Ray actors when `workers` > 1, else in this process."""
    items = [(i, p, s) for i, p in enumerate(policies) for s in seeds]
    col = {s: j for j, s in enumerate(seeds)}
    out = np.zeros((len(policies), len(seeds)))
    ended = np.zeros((len(policies), len(seeds)))
    bar = progress(total=len(items), desc="real", unit="ep", disable=not show_progress)
    try:
        if workers > 1 or ray_address:
            from rollouts.parallel import ActorPool

            args = (*worker_args, True)
            with ActorPool(FidelityWorker, args, n=workers, ray_address=ray_address) as pool:
                for (i, _, s), (ret, end) in pool.map_unordered("play", items):
                    out[i, col[s]], ended[i, col[s]] = ret, end
                    bar.update(1)
        else:
            worker = FidelityWorker(*worker_args)
            for item in items:
                i, _, s = item
                out[i, col[s]], ended[i, col[s]] = worker.play(item)
                bar.update(1)
    finally:
        bar.close()
    return out, ended


# ---------------------------------------------------------------------------------- dream side


def starts_from_frames(
    model: StepModel,
    latents: Sequence[torch.Tensor],
    warmup_action: Sequence[float],
    warmup: int,
) -> DreamStarts:
    """Dream starts from encoded real frames: each latents[i] is (W + 1, z_dim), the frames of
    W steps under the warm-up action (or, given `warmup_action` of shape (W, A), under those
    actions in turn). M reads the last `warmup` of those steps from an empty memory, as every
    dream starts (`worldmodels/dream.py`); the start is the last latent."""
    z_seq = torch.stack(list(latents))  # (N, W + 1, z_dim)
    N, W1, _ = z_seq.shape
    actions = torch.as_tensor(np.asarray(warmup_action), dtype=torch.float32)
    actions = actions.expand(W1 - 1, actions.shape[-1])  # (W, A)
    first = max(0, W1 - 1 - warmup)
    return DreamStarts.from_steps(
        model, z_seq[:, first:], actions[first:].expand(N, -1, -1).contiguous()
    )


class _BatchedNumpyPolicy:
    """One stateful numpy policy per dream rollout, stepped together."""

    def __init__(self, make: Callable[[], Any], n: int, seeds: Sequence[int]):
        self.policies = [make() for _ in range(n)]
        for p, s in zip(self.policies, seeds):
            p.reset(int(s))

    def __call__(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        obs = np.zeros(1, np.float32)  # these policies ignore the observation
        return torch.as_tensor(np.stack([p(obs) for p in self.policies]), dtype=torch.float32)


def dream_policy(
    p: PolicySpec,
    n: int,
    action_space,
    generator: torch.Generator,
    seeds: Sequence[int],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A batched `(z, h) -> actions (n, A)` version of a policy for `n` dream rollouts."""
    low = torch.as_tensor(action_space.low, dtype=torch.float32)
    high = torch.as_tensor(action_space.high, dtype=torch.float32)
    if p.kind == "constant":
        a = torch.as_tensor(p.action, dtype=torch.float32).expand(n, -1)
        return lambda z, h: a
    if p.kind == "uniform":
        return lambda z, h: low + (high - low) * torch.rand(n, len(low), generator=generator)
    if p.kind == "correlated":
        return _BatchedNumpyPolicy(partial(CorrelatedRandomPolicy, action_space), n, seeds)
    if p.kind == "controller":
        from worldmodels.controller import BatchController, controller_obs

        ctrl = BatchController(p.params, p.spec)
        return lambda z, h: ctrl(controller_obs(z, h, p.spec)[None])[0]
    raise UserError(f"policy {p.name}: unknown kind {p.kind!r}")


def dream_returns_for(
    model: StepModel,
    dream: DreamConfig,
    policies: Sequence[PolicySpec],
    starts: DreamStarts,
    horizon: int,
    samples: int,
    action_space,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(P, starts) dream return per policy and start, the mean over `samples` dreams each, and
    (P, starts) end rate: the fraction of those dreams that ended within `horizon` steps."""
    N = len(starts)
    out = np.zeros((len(policies), N))
    ended = np.zeros((len(policies), N))
    for i, p in enumerate(policies):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        seeds = [seed * 10_000_000 + i * 100_000 + j for j in range(N * samples)]
        policy = dream_policy(p, N * samples, action_space, g, seeds)
        z = starts.z.repeat_interleave(samples, dim=0)  # (N * samples, z_dim)
        state = starts.state.repeat_interleave(samples)
        ret, end = dream_rollouts(model, policy, z, state, horizon, dream, g)
        out[i] = ret.view(N, samples).mean(dim=1).numpy()
        ended[i] = end.float().view(N, samples).mean(dim=1).numpy()
    return out, ended


@torch.no_grad()
def policy_strip(
    model: StepModel,
    dream: DreamConfig,
    encode: Callable[[list[np.ndarray]], torch.Tensor],
    decode: Callable[[torch.Tensor], np.ndarray],
    show: Callable[[list[np.ndarray]], np.ndarray],
    env,
    policy: PolicySpec,
    seed: int,
    start_step: int = 50,
    warmup_action: Sequence[float] = (0.0, 0.0, 0.0),
    horizon: int = 300,
    every: int = 20,
    dreams: int = 3,
    dream_seed: int = 0,
) -> np.ndarray:
    """A picture of one policy on one track: the real frames (top row, green frames) over
    `dreams` dreams of the same policy from the same start (red frames), a column every `every`
    steps from the frame the policy first sees. After an end (real or dreamed) a row is grey.

    `show` turns real observations into pictures, `decode` latents (N, z_dim) into pictures;
    both give uint8 (N, H, W, 3) of one size. Returns the picture, uint8 (rows, cols, 3).
    """
    real_act = real_policy(policy, env.action_space)
    warm = np.asarray(warmup_action, dtype=np.float32)
    _, _, frames = play_from_warmup(env, real_act, seed, start_step, warm, horizon, keep_all=True)
    start = starts_from_frames(
        model, [encode(frames[: start_step + 1])], warmup_action, dream.warmup
    )
    z, state = start.z.repeat(dreams, 1), start.state.repeat_interleave(dreams)  # (dreams, .)
    g = torch.Generator().manual_seed(dream_seed)
    act = dream_policy(
        policy, dreams, env.action_space, g, [dream_seed * 1000 + i for i in range(dreams)]
    )
    cols = list(range(0, horizon + 1, every))
    picked, shown = {0: z}, {0: torch.ones(dreams, dtype=torch.bool)}
    alive = torch.ones(dreams, dtype=torch.bool)  # (dreams,)
    for t in range(1, horizon + 1):
        s = model.step(state, z, act(z, model.features(state)), dream.temperature, g)
        if t in cols:  # the frame a dream ends on is shown, none after it
            picked[t], shown[t] = s.z, alive.clone()
        alive &= s.end_prob <= dream.end_threshold
        z, state = s.z, s.state
    dreamed = decode(torch.cat([picked[t] for t in cols]))  # (cols * dreams, H, W, 3)
    dreamed = dreamed.reshape(len(cols), dreams, *dreamed.shape[1:])
    real = show(frames[start_step:])  # (steps seen + 1, H, W, 3)
    grey = np.full_like(dreamed[0, 0], 128)
    rows = [[framed(real[t], (0, 200, 0)) if t < len(real) else grey for t in cols]]
    for i in range(dreams):
        row = [framed(dreamed[j, i], (220, 0, 0)) for j in range(len(cols))]
        rows.append([f if shown[t][i] else grey for f, t in zip(row, cols)])
    gap = lambda a: np.pad(a, ((1, 1), (1, 1), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([np.concatenate([gap(f) for f in row], axis=1) for row in rows])


# ---------------------------------------------------------------------------------- M diagnostics


@torch.no_grad()
def open_loop_errors(
    model: StepModel,
    dream: DreamConfig,
    episodes: Sequence[dict[str, np.ndarray]],
    horizons: Sequence[int] = (1, 10, 50),
    context: int = 20,
    starts_per_episode: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Open-loop prediction error of z, reward and done under real episodes' own actions.

    From a start point t0 of each episode (after `context` real steps M reads), M runs on its
    own draws at the dream's temperature under the episode's actions. At each horizon k: mean
    squared error of the dreamed z against the real z_{t0+k} (and of persistence, z_{t0}, for
    scale), absolute error of the predicted reward against the reward target, and accuracy of
    the predicted end.

    `episodes`: dicts with `z` (T+1, z_dim), `actions` (T, A), `rewards` (T,) reward-head
    targets, `done` (T,).
    """
    H = max(horizons)
    rng = np.random.default_rng(seed)
    rows = []
    for ep in episodes:
        T = len(ep["actions"])
        if T < context + H:
            continue
        for t0 in rng.integers(context, T - H + 1, size=starts_per_episode):
            rows.append((ep, int(t0)))
    if not rows:
        raise UserError(f"open-loop diagnostics: no episode is longer than {context + H} steps")
    z_real = torch.stack(
        [
            torch.as_tensor(ep["z"][t0 - context : t0 + H + 1], dtype=torch.float32)
            for ep, t0 in rows
        ]
    )  # (B, context + H + 1, z_dim)
    acts = torch.stack(
        [
            torch.as_tensor(ep["actions"][t0 - context : t0 + H], dtype=torch.float32)
            for ep, t0 in rows
        ]
    )  # (B, context + H, A)
    rew = np.stack([ep["rewards"][t0 : t0 + H] for ep, t0 in rows])  # (B, H)
    done = np.stack([ep["done"][t0 : t0 + H] for ep, t0 in rows])  # (B, H)
    start = DreamStarts.from_steps(model, z_real[:, : context + 1], acts[:, :context])
    g = torch.Generator().manual_seed(seed)
    z, state = start.z, start.state
    z_err, r_err, d_acc = [], [], []
    for k in range(H):
        s = model.step(state, z, acts[:, context + k], dream.temperature, g)
        z, state = s.z, s.state
        z_err.append(((z - z_real[:, context + k + 1]) ** 2).mean(dim=1).numpy())
        r_err.append(np.abs(s.reward.numpy() - rew[:, k]))
        ended = (s.end_prob > dream.end_threshold).numpy()
        d_acc.append((ended == (done[:, k] > 0.5)).astype(np.float64))
    persist = ((z_real[:, context : context + 1] - z_real[:, context + 1 :]) ** 2).mean(dim=2)
    out: dict[str, Any] = {"starts": len(rows)}
    for k in horizons:
        out[f"z_mse_{k}"] = round(float(z_err[k - 1].mean()), 4)
        out[f"z_mse_persistence_{k}"] = round(float(persist[:, k - 1].mean()), 4)
        out[f"reward_mae_{k}"] = round(float(r_err[k - 1].mean()), 4)
        out[f"done_acc_{k}"] = round(float(d_acc[k - 1].mean()), 4)
    return out


@torch.no_grad()
def reward_response(
    model: StepModel,
    dream: DreamConfig,
    starts: DreamStarts,
    actions: dict[str, Sequence[float]],
    steps: int = 50,
    samples: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Mean predicted reward per step over `steps` dream steps under each constant action, from
    the same starts: how strongly M's reward responds to what the car does."""
    out = {}
    for name, a in actions.items():
        g = torch.Generator().manual_seed(seed)
        act = torch.as_tensor(a, dtype=torch.float32).expand(len(starts) * samples, -1)
        z = starts.z.repeat_interleave(samples, dim=0)
        state = starts.state.repeat_interleave(samples)
        total, _ = dream_rollouts(model, lambda z, h, act=act: act, z, state, steps, dream, g)
        out[name] = round(float(total.mean()) / steps, 4)
    return out


# ------------------------------------------------------------------------------ the whole measure


def measure_fidelity(
    model: StepModel,
    dream: DreamConfig,
    encode: Callable[[list[np.ndarray]], torch.Tensor],
    env_fn: Callable[[], Any],
    policies: Sequence[PolicySpec],
    seeds: Sequence[int],
    start_step: int = 50,
    warmup_action: Sequence[float] = (0.0, 0.0, 0.0),
    horizon: int = 300,
    dream_samples: int = 4,
    workers: int = 1,
    ray_address: str | None = None,
    agent_factory: Callable | None = None,
    real: np.ndarray | None = None,
    seed: int = 0,
    show_progress: bool = False,
    real_ended: np.ndarray | None = None,
) -> FidelityResult:
    """Dream and real returns of `policies` from the same tracks (see the module docstring).

    Args:
        model: M's one-step protocol (`m.stepper()`), dreaming as `dream` says.
        encode: real frames (start_step + 1 of them) -> their latents (start_step + 1, z_dim).
        env_fn: makes the real env.
        real: precomputed real returns (P, tracks), e.g. cached from an earlier call.
        real_ended: their ends (P, tracks), 0/1; with `real` but without it, the result has no
            real end rates. Ignored without `real`: both are then measured.
    """
    worker_args = (env_fn, start_step, tuple(warmup_action), horizon, agent_factory)
    probe = FidelityWorker(*worker_args[:4])
    latents = [encode(probe.warmup_frames(s)) for s in seeds]
    starts = starts_from_frames(model, latents, warmup_action, dream.warmup)
    dreamed, dream_ended = dream_returns_for(
        model, dream, policies, starts, horizon, dream_samples, probe.env.action_space, seed
    )
    if real is None:
        real, real_ended = real_returns(
            worker_args, policies, seeds, workers, ray_address, show_progress
        )
    extra = {
        "reward_response": reward_response(
            model,
            dream,
            starts,
            {"stop": (0.0, 0.0, 0.0), "full_gas": (0.0, 1.0, 0.0)},
            steps=min(50, horizon),
            samples=dream_samples,
            seed=seed,
        )
    }
    return FidelityResult([p.name for p in policies], dreamed, real, extra, dream_ended, real_ended)


# ---------------------------------------------------------------------------------- the command


@dataclass
class FidelityConfig(RunConfig):
    """Settings of `wm fidelity`."""

    vae: str = setting("", "V checkpoint (default: <run_dir>/vae/checkpoints)")
    m: str = setting("", "M checkpoint (default: the run's last round, m[_iterK])")
    store: str = setting("", "episode store V was trained on (default: <run_dir>/store)")
    latents: str = setting("", "latent store for M's diagnostics (default: <run_dir>/latents)")
    policies: list[str] = setting(
        list(FIXED_POLICIES), f"fixed policies to compare, some of: {', '.join(FIXED_POLICIES)}"
    )
    controllers: list[str] = setting([], "controller checkpoints to compare as well")
    search: str = setting(
        "",
        "a controller checkpoint whose CMA-ES candidates to compare as well: does the dream "
        "rank the controllers evolution chooses between as the real env does?",
    )
    search_generations: list[int] = setting(
        [], "generations (from 1) to take candidates from (default: four from first to last)"
    )
    search_per_generation: int = setting(
        4, "candidates per generation, at evenly spaced ranks of their recorded return", min=1
    )
    tracks: int = setting(16, "real tracks, and dream start states taken from them", min=2)
    horizon: int = setting(300, "steps each policy drives, in the dream and for real", min=1)
    start_step: int = setting(
        50, "real steps of the warm-up action before a policy takes over", min=1
    )
    warmup_action: list[float] = setting([0.0, 0.0, 0.0], "action held during the warm-up")
    dream: DreamConfig = setting(default_factory=DreamConfig, doc="how M dreams")
    dream_samples: int = setting(
        4, "dreams per start state (their mean is the start's return)", min=1
    )
    horizons: list[int] = setting([1, 10, 50], "open-loop diagnostic horizons")
    context: int = setting(20, "teacher-forced steps before the open-loop diagnostics", min=1)
    env_id: str = setting("CarRacingFast-v3", "gymnasium env id")
    workers: int | None = setting(
        None, "Ray workers for real episodes (default: one per core)", min=1
    )
    ray_address: str | None = setting(None, "existing Ray cluster address (default: local)")
    name: str = setting("", "output folder under <run_dir>/fidelity/ (default: tau<temperature>)")
    strip: list[str] = setting(
        ["gas_0.5", "full_gas"],
        "fixed policies drawn in strip.png: on the first track, the real frames over "
        "strip_dreams decoded dreams of the same policy from the same start ([]: none)",
    )
    strip_every: int = setting(20, "steps between the columns of strip.png", min=1)
    strip_dreams: int = setting(3, "dreams per policy in strip.png", min=1)

    def validate(self) -> None:
        super().validate()
        for n in self.policies:
            fixed_policy(n)
        for n in self.strip:
            if n not in FIXED_POLICIES:
                raise UserError(
                    f"strip: unknown policy {n!r}; expected some of {', '.join(FIXED_POLICIES)}"
                )
        if len(self.warmup_action) != 3:
            raise UserError("warmup_action: expected 3 numbers [steer, gas, brake]")
        if not self.horizons or min(self.horizons) < 1:
            raise UserError("horizons: expected positive step counts")
        if len(self.policies) + len(self.controllers) < 2:
            raise UserError("policies, controllers: need at least two policies to rank")


def _stage_dir(path: str | Path) -> Path:
    """The stage folder of a checkpoint path (its step folder or checkpoints folder or itself)."""
    p = Path(path).resolve()
    while p.name == "checkpoints" or p.name.startswith("step_"):
        p = p.parent
    return p


def controller_m(c_cfg: dict) -> str:
    """The M a controller was evolved with (it reads that M's memory), from its config."""
    return c_cfg.get("m") or str(RunLayout(Path(c_cfg["runs_dir"], c_cfg["run_name"])).m())


def _cache_key(cfg: FidelityConfig, p: PolicySpec, seeds: Sequence[int]) -> str:
    return json.dumps(
        [cfg.env_id, p.kind, p.action, list(seeds), cfg.start_step, cfg.warmup_action, cfg.horizon]
    )


def _cached_real(cache: dict[str, Any], key: str | None, tracks: int) -> tuple[list, list] | None:
    """(returns, ended) of a cache entry, or None when it must be measured: no key (controllers
    depend on V and M), no entry, or an entry from before ends were cached (a plain list)."""
    entry = cache.get(key) if key is not None else None
    if not isinstance(entry, dict):
        return None
    returns, ended = entry.get("returns"), entry.get("ended")
    if not isinstance(returns, list) or not isinstance(ended, list):
        return None
    if len(returns) != tracks or len(ended) != tracks:
        return None
    return returns, ended


def main(cfg: FidelityConfig) -> int:
    from PIL import Image

    from gen_core.vae import images_to_float, images_to_uint8
    from rollouts.recording import make_env, preprocess
    from worldmodels.agent import WorldModelAgent, load_agent_parts
    from worldmodels.episodes import split_episodes
    from worldmodels.evolve import load_search_history
    from worldmodels.latents import LatentStore
    from worldmodels.models import check_controller_spec, load_controller
    from worldmodels.sequences import reward_targets

    run = start_run(cfg, "fidelity")
    layout = RunLayout(cfg.run_dir)
    m_path = Path(cfg.m or layout.m_checkpoints(layout.last_round()))
    torch.set_num_threads(max(1, cfg.threads or cores()))
    vae, m, spec, frames = load_agent_parts(
        Path(cfg.vae or layout.vae_checkpoints), m_path, Path(cfg.store or layout.store)
    )
    stepper = m.stepper()
    m_cfg = checkpoint_config(m_path)  # M itself came with the agent parts above
    policies = [fixed_policy(n) for n in cfg.policies]

    def controller(name: str, params: np.ndarray, c_spec, c_cfg: dict, path: str) -> PolicySpec:
        trained_with = controller_m(c_cfg)
        if _stage_dir(trained_with) != _stage_dir(m_path):
            # C reads M's hidden state: with another M its inputs mean something else.
            run.log.warning(
                f"fidelity: {path} was evolved with M {trained_with}, not {m_path}; its real and "
                "dream returns here are those of C on this M's hidden state"
            )
        check_controller_spec(c_spec, spec, path)  # its spec from model.yaml, as V and M allow
        return PolicySpec(name, "controller", None, params, c_spec)

    for i, path in enumerate(cfg.controllers):
        params, c_spec, c_cfg = load_controller(Path(path), "auto")
        policies.append(controller(f"controller_{i + 1}", params, c_spec, c_cfg, path))
    searched: list[tuple[int, float]] = []  # (generation, recorded return) per search policy
    if cfg.search:
        candidates, returns, c_cfg = load_search_history(Path(cfg.search))
        _, c_spec, _ = load_controller(Path(cfg.search), "mean")
        picks = pick_candidates(returns, cfg.search_generations, cfg.search_per_generation)
        for g, rank, i in picks:
            candidate = candidates[g - 1][i]
            policies.append(controller(f"g{g}_r{rank}", candidate, c_spec, c_cfg, cfg.search))
            searched.append((g, float(returns[g - 1][i])))

    def stored_frames(obs_list: list[np.ndarray]) -> np.ndarray:
        """Env frames as the store keeps them (what V reads): (N, size, size, 3) uint8."""
        return np.stack([preprocess(o, frames.size, frames.crop_bottom) for o in obs_list])

    def encode(obs_list: list[np.ndarray]) -> torch.Tensor:
        x = stored_frames(obs_list)
        with torch.no_grad():
            return vae.encode(images_to_float(torch.from_numpy(x)))[0]  # (W + 1, z_dim)

    seeds = [FIDELITY_SEED_BASE + cfg.seed * 10_000 + i for i in range(cfg.tracks)]
    env_fn = partial(make_env, cfg.env_id, cfg.start_step + cfg.horizon + 1)
    agent_factory = partial(WorldModelAgent, vae, m, spec, frames)

    # Real returns of fixed policies depend on neither V nor M: one cache serves every run.
    cache_path = Path(cfg.runs_dir) / "fidelity_real_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    keys = [_cache_key(cfg, p, seeds) if p.kind != "controller" else None for p in policies]
    cached = [_cached_real(cache, k, len(seeds)) for k in keys]
    todo = [i for i, entry in enumerate(cached) if entry is None]
    worker_args = (env_fn, cfg.start_step, tuple(cfg.warmup_action), cfg.horizon, agent_factory)
    real = np.zeros((len(policies), len(seeds)))
    real_ended = np.zeros((len(policies), len(seeds)))
    for i, entry in enumerate(cached):
        if entry is not None:
            real[i], real_ended[i] = entry
    if todo:
        n_workers = min(cfg.workers or cores(), len(todo) * len(seeds))
        real[todo], real_ended[todo] = real_returns(
            worker_args,
            [policies[i] for i in todo],
            seeds,
            n_workers,
            cfg.ray_address,
            cfg.progress,
        )
        for i in todo:
            if keys[i] is not None:
                cache[keys[i]] = {"returns": real[i].tolist(), "ended": real_ended[i].tolist()}
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps(cache) + "\n")

    result = measure_fidelity(
        stepper,
        cfg.dream,
        encode,
        env_fn,
        policies,
        seeds,
        cfg.start_step,
        cfg.warmup_action,
        cfg.horizon,
        cfg.dream_samples,
        real=real,
        seed=cfg.seed,
        real_ended=real_ended,
    )

    # The candidates get their own ranking: mixed with the fixed policies they would drown it.
    result, candidates = result.split(len(policies) - len(searched))

    # M's open-loop diagnostics on the episodes M held out (V's split rule).
    latents = LatentStore(cfg.latents or layout.latents)
    indices = latents.indices()
    _, held = split_episodes(
        list(indices), m_cfg.get("heldout_fraction", 0.05), m_cfg.get("seed", 0)
    )
    held = set(held) or set(indices[:4])
    episodes = []
    for index, ep in latents.iter_episodes():
        if index in held:
            episodes.append(
                {
                    "z": ep["mu"].astype(np.float32),
                    "actions": ep["actions"].astype(np.float32),
                    "rewards": reward_targets(
                        ep["rewards"],
                        m_cfg.get("reward_target", "raw"),
                        clip=m_cfg.get("reward_clip", []),
                    ),
                    "done": ep["terminated"].astype(np.float32),
                }
            )
    diag = open_loop_errors(stepper, cfg.dream, episodes, cfg.horizons, cfg.context, seed=cfg.seed)
    result.extra["open_loop"] = diag
    if searched:
        result.extra["search"] = search_agreement(
            [g for g, _ in searched],
            [r for _, r in searched],
            candidates.dream_mean,
            candidates.real_mean,
        )

    tau = cfg.dream.temperature
    out = run.dir / (cfg.name or f"tau{tau:g}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "name": "fidelity",
        "temperature": tau,
        "tracks": cfg.tracks,
        "horizon": cfg.horizon,
        **result.summary(),
    }
    tables = {"table": result.table()}
    markdown = result.markdown()
    if searched:
        tables["search_table"] = candidates.table()
        markdown += f"\n### CMA-ES candidates of {cfg.search}\n\n{candidates.markdown()}"
    if cfg.strip:
        strip_env = env_fn()
        pictures = [
            policy_strip(
                stepper,
                cfg.dream,
                encode,
                lambda z: images_to_uint8(vae.decode(z)).numpy(),
                stored_frames,
                strip_env,
                fixed_policy(n),
                seeds[0],
                cfg.start_step,
                cfg.warmup_action,
                cfg.horizon,
                cfg.strip_every,
                cfg.strip_dreams,
                cfg.seed,
            )
            for n in cfg.strip
        ]
        strip_env.close()
        pad = lambda a: np.pad(a, ((0, 8), (0, 0), (0, 0)), constant_values=255)  # noqa: E731
        with atomic_path(out / "strip.png", suffix=".png") as tmp:
            Image.fromarray(np.concatenate([pad(p) for p in pictures])).save(tmp, format="PNG")
        markdown += (
            f"\n![real and dreamed frames](strip.png)\n\nstrip.png: {', '.join(cfg.strip)} "
            f"on the first track; in each, the real frames (green) over {cfg.strip_dreams} "
            f"dreams (red), every {cfg.strip_every} steps; grey after an end.\n"
        )
    atomic_write_text(out / "fidelity.json", json.dumps({**summary, **tables}, indent=2) + "\n")
    atomic_write_text(out / "fidelity.md", markdown)
    for png, part, what in [("fidelity", result, "")] + (
        [("search", candidates, "CMA-ES candidates, ")] if searched else []
    ):
        scatter_chart(
            out / f"{png}.png",
            {
                n: (float(x), float(y))
                for n, x, y in zip(part.names, part.real_mean, part.dream_mean)
            },
            f"{what}dream (tau {tau:g}) vs real, {cfg.horizon} steps, "
            f"{cfg.tracks} tracks: Spearman {part.spearman:.2f}",
            xlabel="real mean return",
            ylabel="dream mean return (grey line: dream = real)",
        )
    for row in tables["table"] + tables.get("search_table", []):
        run.log.info(
            f"fidelity {row['policy']:>14}: dream {row['dream_mean']:8.1f}  real "
            f"{row['real_mean']:8.1f}  gap {row['gap']:+8.1f}  ends: dream "
            f"{row['dream_end_rate']:4.0%}  real {row['real_end_rate']:4.0%}"
        )
    run.log.info(
        f"fidelity: Spearman {result.spearman:.3f} (90% over tracks "
        f"{summary['spearman_90'][0]:.2f} to {summary['spearman_90'][1]:.2f}), "
        f"Pearson {result.pearson:.3f}; "
        f"reward response {result.extra['reward_response']}; open loop {diag}; written to {out}"
    )
    if searched:
        run.log.info(
            f"fidelity: CMA-ES candidates of {cfg.search} {result.extra['search']}: Spearman "
            "of this measure's dream and of the return CMA-ES selected by, against the real one"
        )
    print(json.dumps(summary))
    run.close()
    return 0
