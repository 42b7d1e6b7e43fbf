"""Benchmark: nanoGPT's CPU tiny-Shakespeare setting through `wm gen train-text`, against nanoGPT.

    python benchmarks/text_gen.py [--iters N] [key=value ...]   # overrides of the config

One run, on one machine, measures three trainings of the same network (4 layers, 4 heads, 128
wide, block 64, batch 12, no dropout) one after the other:

* project_exact: `wm gen train-text`'s `main` with nanoGPT's exact setting (lr 1e-3, min_lr
  1e-4: the committed config with those two changed);
* project_config: `main` with configs/text_shakespeare_cpu.yaml as committed (lr 2e-3);
* nanogpt: a plain PyTorch loop written here the way nanoGPT's model.py and train.py write it
  (its LayerNorm, CausalSelfAttention with F.scaled_dot_product_attention, GELU MLP, learned
  positions, weight tying, its AdamW parameter groups (not fused on CPU), its get_batch from a
  uint16 np.memmap, its learning-rate schedule, gradient clipping, `loss.item()` every
  iteration as log_interval=1 does), with nanoGPT's exact setting.

Tokens/s count optimiser steps only (evaluation every 250 iterations is left out of all);
`train_speed_ratio` is project_exact / nanogpt (1.0 or more: the project trains at least as
fast). Noise on a shared machine is not the same across the runs, which is why they run in one
process, back to back, with the same threads.

A fourth training, project_rotary, is the committed config with `positions=rotary` (RoFormer
rotations in place of the learned position table); it takes its turns with the other three.

Sampling: tokens/s for 1,000 new tokens after a 6-token prompt with and without the KV cache,
each timed `--repeats` times alternately and the best kept:

* on the trained model of the committed config (learned positions, window 64): past the window
  it slides, and with learned positions every cached key changes, so both samplers recompute the
  window (gen_core/transformer.py) and the cache saves only inside the first window;
* on the trained rotary model (window 64): past the window the cache is a ring and each token
  costs one position. Timed against two samplers without a cache: nanoGPT's (each token
  recomputes the last 64 tokens: `rotary_kv_cache_speedup`) and the toolkit's exact one (it
  recomputes the 253 tokens that reach the next one through 4 layers of 64-token windows, so it
  gives the cache's tokens: `rotary_kv_cache_speedup_exact`);
* on an untrained model of the same width with a 1,024-token window, where all 1,000 tokens fit
  and the cache saves most.

The last line printed is one JSON object. Timings on a shared machine are noisy: other jobs
running at the same time can slow any figure down.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with other jobs,
# spinning threads of two processes starve each other and a training step can take 10x longer.
# Must be set before torch (and with it libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from gen_core.config import load_config  # noqa: E402
from gen_core.transformer import Transformer, TransformerConfig  # noqa: E402
from worldmodels.gen.text import (  # noqa: E402
    TrainTextConfig,
    load_text_model,
    main,
    read_tokens,
)
from worldmodels.gen.text import split as split_tokens  # noqa: E402

CONFIG = REPO / "configs" / "text_shakespeare_cpu.yaml"
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_VAL_LOSS = 1.88


@torch.no_grad()
def full_val_loss(model: Transformer, tokens: torch.Tensor, block: int) -> float:
    """Mean next-token loss over the validation split cut into non-overlapping windows."""
    n = (len(tokens) - 1) // block
    x = tokens[: n * block].view(n, block)  # (N, T)
    y = tokens[1 : n * block + 1].view(n, block)  # (N, T)
    total = 0.0
    for i in range(0, n, 256):
        _, loss = model(x[i : i + 256], y[i : i + 256])
        total += loss.item() * len(x[i : i + 256])
    return total / n


# ----------------------------------------------------------------------------------------------
# nanoGPT, as its model.py and train.py write it (CPU, no torch.compile, float32)


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)


class NanoGPTRun:
    """nanoGPT's train.py for `python train.py config/train_shakespeare_char.py --device=cpu
    --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
    --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`,
    with `iters` in place of 2,000, run a chunk of iterations at a time (`run`), so that it can
    take turns with the project's runs."""

    batch_size, block_size, eval_iters, eval_interval = 12, 64, 20, 250
    learning_rate, min_lr, warmup_iters = 1e-3, 1e-4, 100
    weight_decay, beta1, beta2, grad_clip = 1e-1, 0.9, 0.99, 1.0

    def __init__(self, tokens: np.ndarray, vocab_size: int, iters: int, tmp: Path):
        n = len(tokens)
        self.dir = tmp
        np.asarray(tokens[: int(n * 0.9)], dtype=np.uint16).tofile(tmp / "train.bin")
        np.asarray(tokens[int(n * 0.9) :], dtype=np.uint16).tofile(tmp / "val.bin")
        self.max_iters = self.lr_decay_iters = iters
        torch.manual_seed(1337)
        self.model = GPT(GPTConfig(vocab_size=vocab_size))
        self.optimizer = self.model.configure_optimizers(
            self.weight_decay, self.learning_rate, (self.beta1, self.beta2), "cpu"
        )
        self.X, self.Y = self.get_batch("train")
        self.iter_num, self.train_seconds, self.losses = 0, 0.0, {}

    def get_batch(self, split):
        block_size = self.block_size
        data = np.memmap(self.dir / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (self.batch_size,))
        x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix]
        )
        return x, y

    @torch.no_grad()
    def estimate_loss(self):
        out = {}
        self.model.eval()
        for split in ["train", "val"]:
            losses = torch.zeros(self.eval_iters)
            for k in range(self.eval_iters):
                X, Y = self.get_batch(split)
                logits, loss = self.model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean()
        self.model.train()
        return out

    def get_lr(self, it):
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it > self.lr_decay_iters:
            return self.min_lr
        decay_ratio = (it - self.warmup_iters) / (self.lr_decay_iters - self.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return self.min_lr + coeff * (self.learning_rate - self.min_lr)

    def run(self, until: int) -> None:
        """Train up to iteration `until` (evaluating as train.py does, outside the timing)."""
        model, optimizer = self.model, self.optimizer
        t0 = time.perf_counter()
        while True:
            lr = self.get_lr(self.iter_num)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            it = self.iter_num
            if it % self.eval_interval == 0 and it > 0 or it == self.max_iters:
                self.train_seconds += time.perf_counter() - t0
                self.losses = self.estimate_loss()
                t0 = time.perf_counter()
            if it == until or it == self.max_iters:
                break
            logits, loss = model(self.X, self.Y)
            self.X, self.Y = self.get_batch("train")
            loss.backward()
            if self.grad_clip != 0.0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # log_interval=1: the loss is read every iteration
            self.iter_num += 1
        self.train_seconds += time.perf_counter() - t0

    def summary(self) -> dict:
        return {
            "train_tokens_per_s": self.iter_num
            * self.batch_size
            * self.block_size
            / self.train_seconds,
            "train_s": self.train_seconds,
            "val_loss": float(self.losses["val"]),
            "train_loss": float(self.losses["train"]),
        }


# ----------------------------------------------------------------------------------------------
# sampling


def time_sampling(model: Transformer, prompt: torch.Tensor, n: int, use_cache: bool):
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    out = model.generate(prompt, n, 0.8, None, generator=gen, use_cache=use_cache)
    return n / (time.perf_counter() - t0), out


def cache_speedup(model: Transformer, prompt: torch.Tensor, n: int, repeats: int) -> dict:
    """Best-of-`repeats` tokens/s for `n` new tokens with and without the cache, alternately."""
    cached, plain = [], []
    for _ in range(repeats):
        tps, out_cached = time_sampling(model, prompt, n, use_cache=True)
        cached.append(tps)
        tps, out_plain = time_sampling(model, prompt, n, use_cache=False)
        plain.append(tps)
    return {
        "cache": max(cached),
        "no_cache": max(plain),
        "speedup": max(cached) / max(plain),
        "same_tokens": bool(torch.equal(out_cached, out_plain)),
        "out": out_cached,
    }


def nanogpt_sample_tps(model: Transformer, prompt: torch.Tensor, n: int) -> float:
    """Tokens/s of nanoGPT's `generate`: no cache, each token recomputes the last block_size."""
    gen = torch.Generator().manual_seed(0)
    block, idx = model.config.block_size, prompt
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            x = model.hidden(idx[:, -block:])  # (1, <= block, C)
            logits = model.lm_head(x[:, -1, :]) / 0.8  # (1, V)
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)  # (1, 1)
            idx = torch.cat((idx, nxt), dim=1)
    return n / (time.perf_counter() - t0)


def rotary_speedup(model: Transformer, prompt: torch.Tensor, n: int, repeats: int) -> dict:
    """The ring cache against nanoGPT's sampler and the exact one, alternately, best kept."""
    out = cache_speedup(model, prompt, n, repeats)
    out["nanogpt"] = max(nanogpt_sample_tps(model.eval(), prompt, n) for _ in range(repeats))
    out["speedup_nanogpt"] = out["cache"] / out["nanogpt"]
    return out


class ProjectRun:
    """`wm gen train-text`'s `main` on the config with `overrides`, a chunk of iterations at a
    time: each call resumes the run from its checkpoint (RNG, optimiser and data order as if it
    had not stopped) and trains to `until`; the learning-rate schedule spans `iters`."""

    def __init__(self, tmp: str, name: str, iters: int, overrides: list[str]):
        self.args = [f"runs_dir={tmp}", f"run_name={name}", f"data={DATA}", "progress=false",
                     f"lr_decay_iters={iters}", *overrides]  # fmt: skip
        self.tokens, self.seconds, self.summary = 0.0, 0.0, {}

    def run(self, until: int) -> None:
        self.cfg = load_config(TrainTextConfig, CONFIG, [*self.args, f"iterations={until}"])
        self.summary = main(self.cfg)
        if self.summary["train_tokens_per_s"]:
            self.tokens += self.summary["train_tokens_per_s"] * self.summary["train_seconds"]
            self.seconds += self.summary["train_seconds"]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def main_benchmark(args) -> dict:
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="text_gen_bench_") as tmp:
        base = load_config(TrainTextConfig, CONFIG, [f"data={DATA}", *args.overrides])
        iters = args.iters or base.iterations
        exact = ["lr=1e-3", "min_lr=1e-4"]  # nanoGPT's; the committed config uses 2e-3, 2e-4
        p_exact = ProjectRun(tmp, "exact", iters, [*exact, *args.overrides])
        p_config = ProjectRun(tmp, "config", iters, args.overrides)
        p_rotary = ProjectRun(tmp, "rotary", iters, ["positions=rotary", *args.overrides])
        tokenizer, tokens = read_tokens(DATA, base.tokenizer)
        nano = NanoGPTRun(tokens.numpy(), tokenizer.vocab_size, iters, Path(tmp))
        # the four take turns, a chunk of iterations each, so that a change in the machine's
        # load during the benchmark falls on all of them alike
        chunk_ratios = []  # project_exact / nanogpt tokens/s within each turn
        for k in range(1, args.chunks + 1):
            until = iters * k // args.chunks
            before = (p_exact.tokens, p_exact.seconds, nano.iter_num, nano.train_seconds)
            p_exact.run(until)
            nano.run(until)
            exact_tps = (p_exact.tokens - before[0]) / (p_exact.seconds - before[1])
            nano_tokens = (nano.iter_num - before[2]) * nano.batch_size * nano.block_size
            chunk_ratios.append(exact_tps / (nano_tokens / (nano.train_seconds - before[3])))
            p_config.run(until)
            p_rotary.run(until)
        s_exact, summary, n_sum = p_exact.summary, p_config.summary, nano.summary()
        cfg = p_config.cfg
        model, tokenizer, _ = load_text_model(summary["checkpoint"], "cpu")
        _, val = split_tokens(tokens, cfg.val_fraction, cfg.block_size)
        val_full = full_val_loss(model, val, cfg.block_size)
        rot_model, _, _ = load_text_model(p_rotary.summary["checkpoint"], "cpu")

    # One sequence at a time is a chain of small ops: a second thread only adds synchronisation
    # (on 2 busy cores the cached sampler ran 4x slower with 2 threads than with 1), so every
    # sampler is timed with --sample-threads, the default of `wm gen sample-text`.
    train_threads = torch.get_num_threads()
    torch.set_num_threads(args.sample_threads)
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])  # (1, 6)
    short = cache_speedup(model, prompt, args.sample_tokens, args.repeats)
    text = tokenizer.decode(short.pop("out")[0].tolist())
    rot = rotary_speedup(rot_model, prompt, args.sample_tokens, args.repeats)
    rot_text = tokenizer.decode(rot.pop("out")[0].tolist())

    # all 1,000 tokens inside the window: the cache's saving grows with the context
    torch.manual_seed(0)
    long_model = Transformer(
        TransformerConfig(
            block_size=1024, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_embd=cfg.n_embd,
        )
    ).eval()  # fmt: skip
    long = cache_speedup(long_model, prompt, args.sample_tokens, args.repeats)
    long.pop("out")

    print(f"--- 300 characters sampled with the KV cache (temperature 0.8) ---\n{text[:300]}\n---")
    print(f"--- the same from the rotary model (ring cache) ---\n{rot_text[:300]}\n---")
    ratio = p_exact.tokens_per_s / n_sum["train_tokens_per_s"]
    return {
        "name": "text_gen",
        "iterations": summary["step"],
        "chunks": args.chunks,
        "overrides": args.overrides,
        "train_tokens_per_s": {
            "project_exact": round(p_exact.tokens_per_s),
            "project_config": round(p_config.tokens_per_s),
            "project_rotary": round(p_rotary.tokens_per_s),
            "nanogpt": round(n_sum["train_tokens_per_s"]),
        },
        "train_speed_ratio": round(ratio, 3),
        "train_speed_ratio_median_turn": round(statistics.median(chunk_ratios), 3),
        "train_speed_ratio_turns": [round(r, 3) for r in chunk_ratios],
        # project_exact and project_config differ in the learning rate only: the same compute,
        # so how far this is from 1 is how noisy the machine was
        "noise_config_over_exact": round(p_config.tokens_per_s / p_exact.tokens_per_s, 3),
        "train_speed_ratio_config": round(p_config.tokens_per_s / n_sum["train_tokens_per_s"], 3),
        "val_loss": {
            "project_exact": round(s_exact["val_loss"], 4),
            "project_config": round(summary["val_loss"], 4),
            "project_rotary": round(p_rotary.summary["val_loss"], 4),
            "nanogpt": round(n_sum["val_loss"], 4),
            "nanogpt_reported": NANOGPT_VAL_LOSS,
        },
        "val_loss_full_split_config": round(val_full, 4),
        "train_s": {
            "project_exact": round(p_exact.seconds, 1),
            "project_config": round(p_config.seconds, 1),
            "project_rotary": round(p_rotary.seconds, 1),
            "nanogpt": round(n_sum["train_s"], 1),
        },
        "sample_tokens": args.sample_tokens,
        "sample_tokens_per_s_cache": round(short["cache"], 1),
        "sample_tokens_per_s_no_cache": round(short["no_cache"], 1),
        "kv_cache_speedup": round(short["speedup"], 2),
        "kv_cache_same_tokens": short["same_tokens"],
        "rotary_sample_tokens_per_s_cache": round(rot["cache"], 1),
        "rotary_sample_tokens_per_s_nanogpt": round(rot["nanogpt"], 1),
        "rotary_sample_tokens_per_s_no_cache_exact": round(rot["no_cache"], 1),
        "rotary_kv_cache_speedup": round(rot["speedup_nanogpt"], 2),
        "rotary_kv_cache_speedup_exact": round(rot["speedup"], 2),
        "rotary_kv_cache_same_tokens": rot["same_tokens"],
        "block1024_sample_tokens_per_s_cache": round(long["cache"], 1),
        "block1024_sample_tokens_per_s_no_cache": round(long["no_cache"], 1),
        "block1024_kv_cache_speedup": round(long["speedup"], 2),
        "block1024_kv_cache_same_tokens": long["same_tokens"],
        "threads": train_threads,
        "sample_threads": args.sample_threads,
        "wall_s": round(time.perf_counter() - wall0, 1),
        "units": {
            "train_tokens_per_s": "tokens/s over optimiser steps only; project_exact and nanogpt "
            "run nanoGPT's exact setting (lr 1e-3), project_config the committed config",
            "train_speed_ratio": "project_exact / nanogpt tokens/s (same network, same run)",
            "val_loss": "nats/token, mean of eval_iters=20 random validation batches",
            "val_loss_full_split_config": "nats/token over the whole validation split",
            "sample_tokens_per_s": "new tokens/s, batch 1, 1,000 tokens after a 6-token prompt, "
            "best of --repeats",
            "kv_cache_speedup": "cached / uncached sampling tokens/s",
            "rotary_kv_cache_speedup": "ring cache / nanoGPT's generate (recompute 64) tokens/s",
            "wall_s": "seconds",
        },
        "note": "2 shared CPU cores; other jobs ran at the same time, timings are noisy",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=0, help="iterations (0: the config's 2,000)")
    p.add_argument("--chunks", type=int, default=10, help="turns the four trainings take")
    p.add_argument("--sample-threads", type=int, default=1, help="torch threads for sampling")
    p.add_argument("--repeats", type=int, default=3, help="timings of each sampler (best kept)")
    p.add_argument(
        "--sample-tokens", type=int, default=1000, help="tokens sampled per timing (1,000)"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(main_benchmark(parse_args())))
