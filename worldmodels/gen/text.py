"""`wm gen train-text` and `wm gen sample-text`: a character (or byte) level GPT on a text file.

The training loop follows nanoGPT's train.py: random windows of `block_size` tokens from the
first 90% of the text, AdamW with linear warm-up then cosine decay to `min_lr`, gradient clipping,
and every `eval_interval` iterations a loss estimate on both splits, a log line, TensorBoard
scalars and a checkpoint. Running the same command again resumes from the latest checkpoint of
the run (`<runs_dir>/<run_name>/text/checkpoints`).

    wm gen train-text --config configs/text_shakespeare_cpu.yaml run_name=shakespeare
    wm gen sample-text run_name=shakespeare prompt="ROMEO:" n_tokens=500
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gen_core.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    model_spec,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gen_core.config import ConfigError, setting, to_dict
from gen_core.errors import UserError
from gen_core.runs import (
    RunConfig,
    progress,
    resolve_device,
    seed_everything,
    set_threads,
    start_run,
)
from gen_core.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_dict
from gen_core.transformer import Transformer, TransformerConfig

STAGE = "text"
# Settings that fix the shapes of the weights (or the meaning of token ids): a checkpoint can
# only be resumed with the same values.
SHAPE_KEYS = ["tokenizer", "block_size", "n_layer", "n_head", "n_embd", "bias"]


@dataclass
class TrainTextConfig(RunConfig):
    """Train a decoder-only Transformer on a text file (defaults: nanoGPT's CPU Shakespeare)."""

    data: str = setting("../shared/data/tinyshakespeare.txt", "training text file (UTF-8)")
    tokenizer: Literal["char", "byte"] = setting(
        "char", "char: one token per character of the text; byte: one per UTF-8 byte"
    )
    val_fraction: float = setting(
        0.1,
        "fraction of the text, at its end, held out for validation",
        min=0.0,
        min_inclusive=False,
        max=0.5,
    )
    block_size: int = setting(64, "context length in tokens", min=1)
    n_layer: int = setting(4, "Transformer blocks", min=1)
    n_head: int = setting(4, "attention heads per block", min=1)
    n_embd: int = setting(128, "embedding width (a multiple of n_head)", min=1)
    dropout: float = setting(0.0, "dropout probability", min=0.0, max=1.0)
    bias: bool = setting(False, "biases in Linear layers and LayerNorms")
    positions: Literal["learned", "rotary"] = setting(
        "learned",
        "learned: GPT-2's position table (nanoGPT); rotary: RoFormer's rotations, whose KV cache "
        "keeps sampling one position per token past the context window (sliding window)",
    )
    batch_size: int = setting(12, "sequences per iteration", min=1)
    iterations: int = setting(2000, "optimiser steps in total (a resumed run continues)", min=1)
    lr: float = setting(1e-3, "peak learning rate", min=0.0, min_inclusive=False)
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay", min=0.0)
    warmup_iters: int = setting(100, "iterations of linear learning-rate warm-up", min=0)
    lr_decay_iters: int = setting(
        0, "iteration at which the cosine decay reaches min_lr (0: iterations)", min=0
    )
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices and embeddings", min=0.0)
    beta1: float = setting(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = setting(0.99, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", min=0.0)
    eval_interval: int = setting(250, "iterations between evaluations and checkpoints", min=1)
    eval_iters: int = setting(20, "batches per split averaged for each loss estimate", min=1)

    def validate(self) -> None:
        super().validate()
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd: expected a multiple of n_head ({self.n_head}), got {self.n_embd}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr: expected at most lr ({self.lr}), got {self.min_lr}")


@dataclass
class SampleTextConfig(RunConfig):
    """Sample text from a model trained by `wm gen train-text`."""

    checkpoint: str = setting(
        "", "a step folder, checkpoints folder or run stage folder (empty: runs_dir/run_name/text)"
    )
    prompt: str = setting("", "text the sample continues (empty: a new line)")
    n_tokens: int = setting(500, "tokens to generate", min=1)
    temperature: float = setting(
        0.8, "softmax temperature (0: always the most likely token)", min=0.0
    )
    top_k: int = setting(0, "sample only among the k most likely tokens (0: all)", min=0)
    use_cache: bool = setting(True, "reuse keys and values of earlier positions (faster)")
    threads: int = setting(
        1,
        "torch CPU threads (0: one per core). One: a single sequence is a chain of small ops, "
        "which a second thread slows down (4x with the cache on 2 busy cores)",
        min=0,
    )

    def validate(self) -> None:
        super().validate()
        self.prompt = self.prompt or "\n"  # as nanoGPT's sample.py


# ----------------------------------------------------------------------------------------------
# data


def read_tokens(path: str | Path, tokenizer: str | Tokenizer) -> tuple[Tokenizer, torch.Tensor]:
    """Read a text file and tokenise it; build a char vocabulary when `tokenizer` is "char"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: training text not found (set data=PATH)")
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"{path}: training text is empty")
    if tokenizer == "byte" or isinstance(tokenizer, ByteTokenizer):
        return ByteTokenizer(), torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not valid UTF-8 (byte {err.start}); use tokenizer=byte for any file"
        ) from None
    tok = CharTokenizer.from_text(text) if tokenizer == "char" else tokenizer
    try:
        ids = tok.encode(text)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return tok, torch.tensor(ids, dtype=torch.long)


def split(data: torch.Tensor, val_fraction: float, block_size: int) -> tuple[torch.Tensor, ...]:
    """(train, val): the first and last parts of the token stream, each long enough for a window."""
    n_val = int(len(data) * val_fraction)
    train, val = data[: len(data) - n_val], data[len(data) - n_val :]
    need = block_size + 1  # one window of inputs plus its shifted targets
    if len(train) < need or len(val) < need:
        raise UserError(
            f"data: {len(data)} tokens are too few: the train ({len(train)}) and validation "
            f"({len(val)}) parts need at least {need} each (lower block_size or use more text)"
        )
    return train, val


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, device) -> tuple:
    """Random windows: inputs x (B, T) and next-token targets y (B, T)."""
    ix = torch.randint(len(data) - block_size, (batch_size,))  # (B,) window starts
    chunk = data[ix[:, None] + torch.arange(block_size + 1)]  # (B, T + 1)
    x, y = chunk[:, :-1], chunk[:, 1:]  # (B, T), (B, T)
    if device.type != "cpu":
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def get_lr(it: int, cfg: TrainTextConfig) -> float:
    """Linear warm-up to lr, cosine decay to min_lr by lr_decay_iters, then min_lr (nanoGPT)."""
    decay_iters = cfg.lr_decay_iters or cfg.iterations
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model: Transformer, splits: dict[str, torch.Tensor], cfg, device) -> dict:
    """Mean loss over `eval_iters` random batches of each split, in eval mode (no dropout)."""
    model.eval()
    out = {}
    for name, data in splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, device)
            _, loss = model(x, y)
            losses[k] = loss.item()
        out[name] = losses.mean().item()
    model.train()
    return out


def model_config(cfg: TrainTextConfig, vocab_size: int) -> TransformerConfig:
    return TransformerConfig(
        block_size=cfg.block_size,
        vocab_size=vocab_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        dropout=cfg.dropout,
        bias=cfg.bias,
        rotary=cfg.positions == "rotary",
    )


# ----------------------------------------------------------------------------------------------
# wm gen train-text


def main(cfg: TrainTextConfig) -> dict[str, Any]:
    """Train (or resume) and return a summary: losses, step, tokens/s, seconds."""
    wall_start = time.perf_counter()
    if not Path(cfg.data).is_file():  # before a run folder is made for nothing
        raise UserError(f"{cfg.data}: training text not found (set data=PATH)")
    run = start_run(cfg, STAGE)
    try:
        return _train(cfg, run, wall_start)
    finally:
        run.close()


def _train(cfg: TrainTextConfig, run, wall_start: float) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    ckpt_dir = run.dir / "checkpoints"
    latest = latest_checkpoint(ckpt_dir)
    ckpt = load_checkpoint(latest, map_location=device) if latest is not None else None
    if ckpt is not None:
        check_compatible(ckpt.config, to_dict(cfg), SHAPE_KEYS, ckpt.path)
        # the saved vocabulary keeps token ids meaning the same characters
        tokenizer, data = read_tokens(cfg.data, tokenizer_from_dict(ckpt.state["tokenizer"]))
    else:
        tokenizer, data = read_tokens(cfg.data, cfg.tokenizer)
    train_data, val_data = split(data, cfg.val_fraction, cfg.block_size)

    mcfg = model_config(cfg, tokenizer.vocab_size)
    model = Transformer(mcfg).to(device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
    step, losses = 0, {}
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        set_rng_state(ckpt.state["rng"])
        step, losses = ckpt.step, dict(ckpt.state.get("losses", {}))
        run.log.info(f"resuming from {ckpt.path} (iteration {step} of {cfg.iterations})")
    else:
        run.log.info(
            f"{len(train_data):,} train / {len(val_data):,} val tokens, vocabulary "
            f"{tokenizer.vocab_size} ({tokenizer.kind}), {model.num_params():,} parameters, "
            f"device {device}, {torch.get_num_threads()} threads"
        )

    tokens_per_iter = cfg.batch_size * cfg.block_size
    start_step = step
    train_seconds = 0.0  # optimiser steps only, not evaluation or checkpointing
    bar = progress(
        total=cfg.iterations, initial=step, desc="train-text", unit="it", disable=not cfg.progress
    )
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[run.log]):  # log lines above the bar, not through it
            t0 = time.perf_counter()
            while step < cfg.iterations:
                lr = get_lr(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, device)
                _, loss = model(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                step += 1
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", refresh=False)
                if step % cfg.eval_interval == 0 or step == cfg.iterations:
                    train_seconds += time.perf_counter() - t0
                    splits = {"train": train_data, "val": val_data}
                    losses = estimate_loss(model, splits, cfg, device)
                    tok_s = (step - start_step) * tokens_per_iter / max(train_seconds, 1e-9)
                    run.log.info(
                        f"step {step}/{cfg.iterations}: train loss {losses['train']:.4f}, "
                        f"val loss {losses['val']:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s"
                    )
                    run.scalars(
                        step,
                        train_loss=losses["train"],
                        val_loss=losses["val"],
                        lr=lr,
                        tokens_per_s=tok_s,
                    )
                    state = {
                        "optimizer": optimizer.state_dict(),
                        "rng": rng_state(),
                        "tokenizer": tokenizer.to_dict(),
                        "losses": losses,
                    }
                    save_checkpoint(
                        ckpt_dir,
                        step,
                        model.state_dict(),
                        state,
                        to_dict(cfg),
                        model_spec=model_spec(model),
                    )
                    t0 = time.perf_counter()
    finally:
        bar.close()
    if step == start_step:
        run.log.info(f"already trained for {step} iterations; raise iterations to go on")
    trained = step - start_step
    return {
        "step": step,
        "train_loss": losses.get("train"),
        "val_loss": losses.get("val"),
        "train_tokens_per_s": trained * tokens_per_iter / train_seconds if trained else None,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "checkpoint": str(latest_checkpoint(ckpt_dir)),
    }


# ----------------------------------------------------------------------------------------------
# wm gen sample-text


def load_text_model(path: str | Path, device) -> tuple[Transformer, Tokenizer, Any]:
    """The model and tokeniser of a train-text checkpoint, ready for sampling."""
    model, ckpt = load_model(path, map_location=device, kinds=("Transformer",))
    if "tokenizer" not in ckpt.state:
        raise UserError(f"{ckpt.path}: not a train-text checkpoint (no tokenizer)")
    return model, tokenizer_from_dict(ckpt.state["tokenizer"]), ckpt


def sample_main(cfg: SampleTextConfig) -> int:
    """Print the prompt followed by `n_tokens` sampled tokens."""
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    path = cfg.checkpoint or cfg.run_dir / STAGE
    model, tokenizer, _ = load_text_model(path, device)
    try:
        prompt = tokenizer.encode(cfg.prompt)
    except UserError as err:
        raise UserError(f"prompt: {err}") from None
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(
        idx,
        cfg.n_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        generator=gen,
        use_cache=cfg.use_cache,
    )
    sys.stdout.write(tokenizer.decode(out[0].tolist()) + "\n")
    sys.stdout.flush()
    return 0
