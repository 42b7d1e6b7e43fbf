"""`wm train-mdnrnn`: train M, the MDN-RNN, on the latent episodes written by `wm encode`.

Every epoch draws each step's z afresh from the VAE posterior N(mu, exp(logvar)) as World Models
did, cuts episodes into chunks of `seq_len` steps (truncated backprop through time, with a random
offset per epoch so chunk borders move), and trains on shuffled batches of chunks, each from zero
LSTM state. With `carry_state` (stateful truncated BPTT) a batch instead walks whole episodes
chunk by chunk, each chunk starting from the last one's state, so M learns the memory it runs
with for a whole episode. Held-out episodes give the NLL per latent dimension, the reward MSE and
the done accuracy each epoch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gen_core.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.config import setting, to_dict
from gen_core.errors import UserError
from gen_core.mdnrnn import MDNRNN, MDNRNNConfig
from gen_core.runs import RunConfig, progress, resolve_device, start_run
from worldmodels.latents import LatentStore
from worldmodels.vae import split_episodes

# Settings that fix the shapes of M's weights: a resume must match them.
SHAPE_KEYS = ["hidden", "n_mixtures", "joint_mixture", "reward_target"]
# What checkpoints written before a shape setting existed were trained with.
SHAPE_DEFAULTS = {"joint_mixture": False}


@dataclass
class TrainMDNRNNConfig(RunConfig):
    """Settings of `wm train-mdnrnn`."""

    latents: str = setting("", "latent store from 'wm encode' (default: <run_dir>/latents)")
    out_name: str = setting("mdnrnn", "output folder under the run folder (one per iteration)")
    hidden: int = setting(256, "LSTM hidden units", min=1)
    n_mixtures: int = setting(5, "Gaussians per latent dimension (per z with joint_mixture)", min=1)
    joint_mixture: bool = setting(
        False,
        "one mixture over the whole of z (each draw picks one component for every dimension) "
        "instead of World Models' one per dimension, whose independent picks can stitch parts "
        "of different futures into a z no frame has; on CarRacing it removed the dreams' black "
        "blobs but stalled their slow motion (docs/results/fidelity)",
    )
    reward_weight: float = setting(1.0, "weight of the reward loss", min=0.0)
    done_weight: float = setting(1.0, "weight of the episode-end loss", min=0.0)
    done_pos_weight: float = setting(10.0, "weight of episode-end steps in their loss", min=0.0)
    reward_target: Literal["raw", "progress", "trailing"] = setting(
        "raw",
        "what the reward head learns: the raw step reward; progress, the mean of the next "
        "progress_window rewards (dense, but a forecast of what the data's policy did next); or "
        "trailing, the mean of the last progress_window rewards up to this step (dense and "
        "caused by what already happened, so it follows the dream's own motion)",
    )
    progress_window: int = setting(20, "steps averaged by reward_target=progress|trailing", min=1)
    reward_clip: list[float] = setting(
        [],
        "[low, high]: clip rewards before the target is made, e.g. [-1, 100] keeps CarRacing's "
        "-100 exit (an episode end the done head predicts) out of the reward head ([]: no clip)",
    )
    done_horizon: int = setting(
        1,
        "last steps of each terminated episode that the done head learns as ends: 1 is the end "
        "step alone; k also marks the k-1 steps before it, whose frames may already show what "
        "ends it (CarRacing's playfield edge enters the frame ~20 steps ahead), so the head "
        "learns from k times more examples and a dream ends up to k-1 steps early",
        min=1,
    )
    done_reward: Literal["none", "clipped"] = setting(
        "none",
        "what a dream pays on the step M's done head ends it: none, or clipped, the mean part "
        "of the data's last rewards that reward_clip took out (CarRacing's -100 for leaving "
        "the playfield then comes back where M foresees the exit). Needs data with many exits: "
        "with few, M's false alarms teach C to stand still (docs/results/fidelity)",
    )
    seq_len: int = setting(100, "steps per training chunk (truncated BPTT length)", min=2)
    end_repeats: int = setting(
        1,
        "chunks per epoch that end on each terminated episode's last step: 1 is plain chunking; "
        "more adds end_repeats-1 chunks of seq_len/2..seq_len steps closing on the end, so the "
        "done head and the frames before an exit are not one step in tens of thousands",
        min=1,
    )
    carry_state: bool = setting(
        False,
        "stateful truncated BPTT: each batch walks whole episodes chunk by chunk, every chunk "
        "starting from the last one's LSTM state (gradients cut), so M learns the memory it "
        "runs with over a whole episode; without it every chunk starts from zero state and M's "
        "memory can drift once a dream or a real episode runs past seq_len steps",
    )
    batch_size: int = setting(32, "chunks per batch", min=1)
    epochs: int = setting(20, "passes over the training episodes", min=1)
    lr: float = setting(1e-3, "Adam learning rate", min=0.0, min_inclusive=False)
    grad_clip: float = setting(1.0, "gradient norm clip (0: none)", min=0.0)
    sample_z: bool = setting(True, "draw z from N(mu, var) afresh each epoch (else use mu)")
    z_noise: float = setting(
        1.0,
        "with sample_z, scale of the posterior std: 1 is World Models' full draw; less keeps "
        "the frame-to-frame motion (small in z) from drowning in V's noise",
        min=0.0,
    )
    clean_targets: bool = setting(
        False,
        "with sample_z, score M against V's mean for the next frame while its inputs stay drawn: "
        "the small change a frame makes (a car pulling away) is not drowned in V's noise, and M "
        "still learns to read noisy inputs (its own draws, in a dream)",
    )
    self_feed: int = setting(
        0,
        "extra passes over each batch in which M reads its own draws of z instead of the data's "
        "(each pass's inputs drawn from the previous pass's predictions, so errors compound as "
        "in a dream), scored against the real next z, reward and end: a multi-step open-loop "
        "loss that teaches M to stay on course under its own sampling noise (0: teacher forcing)",
        min=0,
    )
    self_feed_temperature: float = setting(
        1.0, "temperature of the self_feed and free_run draws", min=0.0
    )
    free_run: int = setting(
        0,
        "a second pass per batch whose inputs come from windows of this many steps in which M "
        "runs on its own draws, as in a dream, from a real z at each window's start; scored "
        "against the real next z, reward and end. Teaches M what to do when its dream has "
        "drifted off the data, e.g. to pull away from rest when gas has been on for steps but "
        "its own frames do not show it yet (0: off)",
        min=0,
    )
    free_run_z_only: bool = setting(
        False,
        "with free_run, score the free-running pass on z alone: the reward and done heads learn "
        "from real inputs only, so they are not taught to hedge towards the data's mean reward "
        "when the inputs have drifted",
    )
    free_run_end: int = setting(
        0,
        "with free_run, the last this many steps before an episode's end run on M's own draws "
        "throughout, with no real z re-injected: M learns to see an end coming from its own "
        "dream, as it must when a dreamed car crosses the grass to the playfield's edge (0: "
        "windows as elsewhere)",
        min=0,
    )
    free_run_every: int = setting(
        1,
        "with free_run, run the free-running pass on every k-th batch only: a lighter "
        "free-running loss at less cost (1: every batch)",
        min=1,
    )
    input_noise: float = setting(
        0.0,
        "std of Gaussian noise added to M's z inputs (not its targets) in training, so M learns "
        "to read the state from its memory rather than from one noisy z, as its own draws are in "
        "a dream (GameNGen's noise augmentation; 0: none)",
        min=0.0,
    )
    heldout_fraction: float = setting(0.05, "fraction of episodes held out", min=0.0, max=0.5)

    def validate(self) -> None:
        super().validate()
        if self.end_repeats > 1 and self.carry_state:
            raise UserError(
                "end_repeats > 1 adds chunks that close on episode ends; carry_state walks whole "
                "episodes instead, so set one of them only"
            )
        if self.free_run_end and not self.free_run:
            raise UserError("free_run_end shapes free_run's pass: set free_run too (e.g. 20)")
        if self.reward_clip and (
            len(self.reward_clip) != 2 or self.reward_clip[0] >= self.reward_clip[1]
        ):
            raise UserError(
                f"reward_clip: expected [] or [low, high] with low < high, got {self.reward_clip}"
            )

    def latents_path(self) -> Path:
        return Path(self.latents) if self.latents else self.run_dir / "latents"

    def model_config(self, z_dim: int, action_dim: int, done_reward: float = 0.0) -> MDNRNNConfig:
        return MDNRNNConfig(
            z_dim=z_dim,
            action_dim=action_dim,
            hidden=self.hidden,
            n_mixtures=self.n_mixtures,
            joint_mixture=self.joint_mixture,
            reward_weight=self.reward_weight,
            done_weight=self.done_weight,
            done_pos_weight=self.done_pos_weight,
            done_reward=done_reward,
        )


# ------------------------------------------------------------------------------------- data


@dataclass
class Episode:
    mu: np.ndarray  # (T+1, z_dim)
    logvar: np.ndarray  # (T+1, z_dim)
    actions: np.ndarray  # (T, action_dim)
    rewards: np.ndarray  # (T,) the reward head's target
    done: np.ndarray  # (T,) 1 where the env terminated


def reward_targets(
    rewards: np.ndarray, target: str, window: int, clip: Sequence[float] = ()
) -> np.ndarray:
    """The reward head's target per step t.

    raw: r_t. progress: mean of r_t..r_{t+window-1} (shorter at the end). trailing: mean of
    r_{t-window+1}..r_t (shorter at the start). `clip` = (low, high) clips r first.
    """
    rewards = rewards.astype(np.float32)
    if len(clip):
        rewards = np.clip(rewards, clip[0], clip[1])
    if target == "raw":
        return rewards
    csum = np.concatenate([[0.0], np.cumsum(rewards, dtype=np.float64)])
    idx = np.arange(len(rewards))
    if target == "trailing":
        begin = np.maximum(idx + 1 - window, 0)
        return ((csum[idx + 1] - csum[begin]) / (idx + 1 - begin)).astype(np.float32)
    end = np.minimum(idx + window, len(rewards))
    return ((csum[end] - csum[idx]) / (end - idx)).astype(np.float32)


def done_targets(terminated: np.ndarray, horizon: int = 1) -> np.ndarray:
    """0/1 done targets (T,): the env's terminations, and with an ended episode also the
    `horizon` - 1 steps before its end."""
    done = terminated.astype(np.float32)
    if horizon > 1 and len(done) and done[-1]:
        done[-horizon:] = 1.0
    return done


def clipped_end_reward(store: LatentStore, clip: Sequence[float]) -> float:
    """Mean of what `clip` takes out of the last reward of the episodes the env terminated."""
    if not len(clip):
        return 0.0
    removed = [
        float(r[-1] - np.clip(r[-1], clip[0], clip[1]))
        for _, ep in store.iter_episodes(keys=("rewards", "terminated"))
        for r in [ep["rewards"].astype(np.float64)]
        if len(r) and ep["terminated"][-1]
    ]
    return float(np.mean(removed)) if removed else 0.0


def split_latent_episodes(
    store: LatentStore, episodes: list[Episode], cfg: TrainMDNRNNConfig
) -> tuple[list[Episode], list[Episode]]:
    """(train, held-out) with V's rule, so M holds out the same episodes V did (same seed)."""
    if cfg.heldout_fraction == 0:
        return episodes, []
    position = {index: pos for pos, index in enumerate(store.indices())}
    train, held = split_episodes(list(position), cfg.heldout_fraction, cfg.seed)
    return [episodes[position[i]] for i in train], [episodes[position[i]] for i in held]


def load_episodes(store: LatentStore, cfg: TrainMDNRNNConfig) -> list[Episode]:
    out = []
    for _, ep in store.iter_episodes():
        out.append(
            Episode(
                mu=ep["mu"].astype(np.float32),
                logvar=ep["logvar"].astype(np.float32),
                actions=ep["actions"].astype(np.float32),
                rewards=reward_targets(
                    ep["rewards"], cfg.reward_target, cfg.progress_window, cfg.reward_clip
                ),
                done=done_targets(ep["terminated"], cfg.done_horizon),
            )
        )
    return out


def chunk_bounds(length: int, seq_len: int, first: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] cutting `length` steps into chunks of `seq_len` steps, with a border at
    `first` too (a shorter first chunk, so borders can move between epochs)."""
    cuts = sorted({0, length, *range(first, length, seq_len)})
    return list(zip(cuts[:-1], cuts[1:]))


def make_chunks(
    episodes: list[Episode],
    seq_len: int,
    rng: np.random.Generator,
    sample_z: bool,
    offset: bool,
    z_noise: float = 1.0,
    end_repeats: int = 1,
    clean_targets: bool = False,
) -> dict[str, torch.Tensor]:
    """Cut episodes into padded chunks of `seq_len` steps, z drawn afresh from the posterior.

    With `clean_targets`, z_next is V's mean rather than the draw. With `end_repeats` > 1, each
    episode that ended (done on its last step) gets end_repeats - 1 more chunks of
    seq_len/2..seq_len steps closing on that end.
    Returns tensors z (N, L, z), z_next (N, L, z), actions (N, L, a), rewards, done, mask (N, L).
    """
    rows = {k: [] for k in ("z", "z_next", "actions", "rewards", "done", "mask")}

    def add(ep: Episode, z: np.ndarray, s: int, e: int) -> None:
        target = ep.mu if clean_targets else z
        n, pad = e - s, seq_len - (e - s)

        def padded(x):
            return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

        rows["z"].append(padded(z[s:e]))
        rows["z_next"].append(padded(target[s + 1 : e + 1]))
        rows["actions"].append(padded(ep.actions[s:e]))
        rows["rewards"].append(padded(ep.rewards[s:e]))
        rows["done"].append(padded(ep.done[s:e]))
        rows["mask"].append(padded(np.ones(n, np.float32)))

    for ep in episodes:
        z = ep.mu
        if sample_z:
            eps = rng.standard_normal(ep.mu.shape, np.float32)
            z = ep.mu + z_noise * np.exp(0.5 * ep.logvar) * eps
        T = len(ep.actions)
        start = int(rng.integers(0, seq_len)) if offset else 0
        for s, e in chunk_bounds(T, seq_len, start):
            add(ep, z, s, e)
        if end_repeats > 1 and T and ep.done[-1]:
            shortest, longest = min(T, max(1, seq_len // 2)), min(T, seq_len)
            for n in rng.integers(shortest, longest + 1, size=end_repeats - 1):
                add(ep, z, T - int(n), T)
    return {k: torch.from_numpy(np.stack(v)) for k, v in rows.items()}


def make_lanes(
    episodes: list[Episode],
    batch_size: int,
    rng: np.random.Generator,
    sample_z: bool,
    z_noise: float = 1.0,
    clean_targets: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Whole episodes in shuffled groups of `batch_size`, padded to the group's longest.

    Each group is a dict like `make_chunks`'s, (B, T, ...) with T the group's episode length, to
    be walked chunk by chunk with the LSTM state carried over (`carry_state`).
    """
    order = rng.permutation(len(episodes))
    groups = []
    for g in range(0, len(order), batch_size):
        eps = [episodes[i] for i in order[g : g + batch_size]]
        groups.append(
            make_chunks(
                eps,
                max(len(e.actions) for e in eps),
                rng,
                sample_z,
                False,
                z_noise,
                clean_targets=clean_targets,
            )
        )
    return groups


def training_batches(
    episodes: list[Episode], cfg: TrainMDNRNNConfig, rng: np.random.Generator
) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """One epoch's batches as (batch, new_lane): new_lane False means the batch continues the
    previous one's episodes and starts from its LSTM state (`carry_state`); else zero state."""
    if not cfg.carry_state:
        chunks = make_chunks(
            episodes,
            cfg.seq_len,
            rng,
            cfg.sample_z,
            True,
            cfg.z_noise,
            cfg.end_repeats,
            cfg.clean_targets,
        )
        order = torch.from_numpy(rng.permutation(len(chunks["z"])))
        return [
            ({k: v[idx] for k, v in chunks.items()}, True) for idx in order.split(cfg.batch_size)
        ]
    out = []
    for lane in make_lanes(
        episodes, cfg.batch_size, rng, cfg.sample_z, cfg.z_noise, cfg.clean_targets
    ):
        first = int(rng.integers(1, cfg.seq_len + 1))
        for i, (s, e) in enumerate(chunk_bounds(lane["z"].shape[1], cfg.seq_len, first)):
            out.append(({k: v[:, s:e] for k, v in lane.items()}, i == 0))
    return out


def with_input_noise(batch: dict[str, torch.Tensor], std: float) -> dict[str, torch.Tensor]:
    """The batch with N(0, std^2) noise added to M's z inputs; targets (z_next) untouched."""
    if std <= 0:
        return batch
    return batch | {"z": batch["z"] + std * torch.randn_like(batch["z"])}  # (B, T, z_dim)


@torch.no_grad()
def free_run_inputs(
    model: MDNRNN,
    batch: dict[str, torch.Tensor],
    window: int,
    temperature: float,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    phase: int = 0,
    end_run: int = 0,
) -> torch.Tensor:
    """M's inputs for a free-running pass: the real z at t = 0 and wherever t = phase (mod
    window); in between, z drawn from M's prediction at the step before. In a row whose chunk
    holds an end (`batch["done"]`), no real z after the step `end_run` steps before it (t = 0
    excepted). Returns z (B, T, z_dim).
    """
    z_real, actions = batch["z"], batch["actions"]
    (B, T, _), hidden = z_real.shape, model.config.hidden
    m = model.stepper()  # the dream's fused step, with the weights of this batch
    if state is None:
        h = c = torch.zeros(B, hidden, device=z_real.device)
    else:
        h, c = state[0][0], state[1][0]
    steps = torch.arange(T, device=z_real.device)
    real = ((steps - phase) % window == 0) | (steps == 0)  # (T,)
    real = real.expand(B, T).clone()  # (B, T)
    if end_run:
        ends = batch["done"] > 0.5  # (B, T)
        no_end = T + end_run  # a row without an end keeps all its windows
        first_end = torch.where(ends.any(dim=1), ends.float().argmax(dim=1), no_end)  # (B,)
        real &= (steps[None] <= first_end[:, None] - end_run) | (steps[None] == 0)
    inputs, z = [], z_real[:, 0]
    for t in range(T):
        z = torch.where(real[:, t, None], z_real[:, t], z)  # (B, z_dim)
        inputs.append(z)
        h, c = m.lstm(z, actions[:, t], h, c)  # (B, hidden) each
        z = m.sample(m.heads(h), temperature)  # (B, z_dim) drawn z_{t+1}
    return torch.stack(inputs, dim=1)  # (B, T, z_dim)


def self_fed_loss(
    model: MDNRNN,
    batch: dict[str, torch.Tensor],
    out,
    terms: dict[str, torch.Tensor],
    cfg: TrainMDNRNNConfig,
    state: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """The loss averaged over the teacher-forced pass (`out`, `terms`) and `cfg.self_feed`
    passes whose inputs are M's own draws: z_0 real, then z_{t+1} drawn from the previous
    pass's prediction at t (no gradient through the draw). Targets stay the real ones."""
    total = terms["loss"]
    for _ in range(cfg.self_feed):
        with torch.no_grad():
            drawn = model.sample(out, cfg.self_feed_temperature)  # (B, T, z_dim) z_{t+1}
            z = torch.cat([batch["z"][:, :1], drawn[:, :-1]], dim=1)  # (B, T, z_dim)
        out = model(z, batch["actions"], state)
        fed = model.loss(out, batch["z_next"], batch["rewards"], batch["done"], batch["mask"])
        total = total + fed["loss"]
    return terms | {"loss": total / (cfg.self_feed + 1), "self_fed_loss": fed["loss"]}


def free_run_loss(
    model: MDNRNN,
    batch: dict[str, torch.Tensor],
    terms: dict[str, torch.Tensor],
    cfg: TrainMDNRNNConfig,
    state: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """The loss averaged over the teacher-forced pass (`terms`) and one pass on
    `free_run_inputs` (windows of `cfg.free_run` steps), scored against the real targets (the
    next z only, with `cfg.free_run_z_only`)."""
    # A random phase per batch, so every step is sometimes a window's start.
    phase = int(torch.randint(cfg.free_run, ()))
    z_in = free_run_inputs(
        model, batch, cfg.free_run, cfg.self_feed_temperature, state, phase, cfg.free_run_end
    )
    out = model(z_in, batch["actions"], state)
    free = model.loss(out, batch["z_next"], batch["rewards"], batch["done"], batch["mask"])
    scored = free["nll"] if cfg.free_run_z_only else free["loss"]
    return terms | {"loss": (terms["loss"] + scored) / 2, "free_run_loss": scored}


@torch.no_grad()
def evaluate(model: MDNRNN, chunks: dict[str, torch.Tensor], device, batch: int = 64) -> dict:
    """Held-out NLL per latent dimension, reward MSE and done accuracy (masked means)."""
    model.eval()
    sums = {"nll": 0.0, "reward_mse": 0.0, "done_correct": 0.0, "n": 0.0}
    for i in range(0, len(chunks["z"]), batch):
        b = {k: v[i : i + batch].to(device) for k, v in chunks.items()}
        out = model(b["z"], b["actions"])
        terms = model.loss(out, b["z_next"], b["rewards"], b["done"], b["mask"])
        n = b["mask"].sum().item()
        sums["n"] += n
        sums["nll"] += terms["nll"].item() * n
        if "reward_mse" in terms:
            sums["reward_mse"] += terms["reward_mse"].item() * n
        if out.done_logit is not None:
            pred = (out.done_logit > 0).float()
            sums["done_correct"] += ((pred == b["done"]).float() * b["mask"]).sum().item()
    model.train()
    n = max(sums["n"], 1.0)
    return {
        "nll": sums["nll"] / n,
        "reward_mse": sums["reward_mse"] / n,
        "done_acc": sums["done_correct"] / n,
    }


# ------------------------------------------------------------------------------------- main


def main(cfg: TrainMDNRNNConfig) -> int:
    run = start_run(cfg, "mdnrnn", folder=cfg.out_name)
    device = resolve_device(cfg.device)
    store = LatentStore(cfg.latents_path())
    episodes = load_episodes(store, cfg)
    if not episodes:
        raise UserError(f"{store.path}: no encoded episodes; run 'wm encode' first")
    z_dim, action_dim = episodes[0].mu.shape[1], episodes[0].actions.shape[1]
    train_eps, held_eps = split_latent_episodes(store, episodes, cfg)

    done_reward = (
        clipped_end_reward(store, cfg.reward_clip) if cfg.done_reward == "clipped" else 0.0
    )
    model = MDNRNN(cfg.model_config(z_dim, action_dim, done_reward)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt_dir = run.dir / "checkpoints"
    config = to_dict(cfg) | {"z_dim": z_dim, "action_dim": action_dim}
    config["dream_done_reward"] = done_reward  # measured from the data
    start_epoch = 0
    if latest_checkpoint(ckpt_dir) is not None:
        ck = load_checkpoint(ckpt_dir, map_location=device)
        saved = SHAPE_DEFAULTS | ck.config
        check_compatible(saved, config, SHAPE_KEYS + ["z_dim", "action_dim"], ck.path)
        model.load_state_dict(ck.model)
        opt.load_state_dict(ck.state["optim"])
        set_rng_state(ck.state["rng"])
        start_epoch = ck.step
        run.log.info(f"mdnrnn: resumed from {ck.path} (epoch {start_epoch})")
    data_rng = np.random.default_rng([cfg.seed, start_epoch])
    # With carried state M is scored over whole held-out episodes, as a dream or agent runs it.
    held_len = max((len(e.actions) for e in held_eps), default=1) if cfg.carry_state else 0
    held = make_chunks(
        held_eps,
        held_len or cfg.seq_len,
        np.random.default_rng(cfg.seed),
        cfg.sample_z,
        False,
        cfg.z_noise,
        clean_targets=cfg.clean_targets,
    )
    run.log.info(
        f"mdnrnn: {len(train_eps)} train / {len(held_eps)} held-out episodes, z_dim {z_dim}, "
        f"{sum(p.numel() for p in model.parameters())} parameters, device {device}, "
        f"done reward {done_reward:.1f}"
    )

    for epoch in range(start_epoch, cfg.epochs):
        batches = training_batches(train_eps, cfg, data_rng)
        n_batches = len(batches)
        bar = progress(
            batches,
            desc=f"mdnrnn {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        t0, steps, total, state = time.perf_counter(), 0.0, 0.0, None
        for i, (batch, new_lane) in enumerate(bar):
            batch = {k: v.to(device) for k, v in batch.items()}
            batch = with_input_noise(batch, cfg.input_noise)
            start = None if new_lane else state  # the LSTM state this chunk starts from
            out = model(batch["z"], batch["actions"], start)
            terms = model.loss(out, batch["z_next"], batch["rewards"], batch["done"], batch["mask"])
            if cfg.self_feed:
                terms = self_fed_loss(model, batch, out, terms, cfg, start)
            if cfg.free_run and i % cfg.free_run_every == 0:
                terms = free_run_loss(model, batch, terms, cfg, start)
            # The next chunk starts from the teacher-forced state: real context, as in a dream's
            # warm-up. Gradients stop at chunk borders.
            state = tuple(x.detach() for x in out.state)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            steps += batch["mask"].sum().item()
            total += terms["loss"].item()
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
        bar.close()
        elapsed = time.perf_counter() - t0
        metrics = evaluate(model, held, device) if held_eps else {}
        run.scalars(
            epoch + 1,
            train_loss=total / n_batches,
            steps_per_s=steps / elapsed,
            **{f"heldout_{k}": v for k, v in metrics.items()},
        )
        run.log.info(
            f"mdnrnn epoch {epoch + 1}/{cfg.epochs}: train loss {total / n_batches:.4f}"
            + "".join(f", held-out {k} {v:.4f}" for k, v in metrics.items())
            + f", {steps / elapsed:.0f} seq-steps/s"
        )
        save_checkpoint(
            ckpt_dir,
            epoch + 1,
            model.state_dict(),
            {"optim": opt.state_dict(), "rng": rng_state(), "metrics": metrics},
            config,
        )
        data_rng = np.random.default_rng([cfg.seed, epoch + 1])
    run.close()
    return 0


def load_mdnrnn(path: str | Path, map_location="cpu") -> tuple[MDNRNN, dict]:
    """M from a checkpoint (a step folder, its checkpoints folder or the stage folder)."""
    ck = load_checkpoint(path, map_location=map_location)
    c = SHAPE_DEFAULTS | ck.config
    model = MDNRNN(
        MDNRNNConfig(
            z_dim=c["z_dim"],
            action_dim=c["action_dim"],
            hidden=c["hidden"],
            n_mixtures=c["n_mixtures"],
            joint_mixture=c["joint_mixture"],
            done_reward=c.get("dream_done_reward", 0.0),
        )
    )
    model.load_state_dict(ck.model)
    model.eval()
    return model, c
