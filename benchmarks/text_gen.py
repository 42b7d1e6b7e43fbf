"""Benchmark: nanoGPT's CPU tiny-Shakespeare setting through `wm gen train-text`, then sampling.

    python benchmarks/text_gen.py [key=value ...]   # optional overrides of the config

Trains with configs/text_shakespeare_cpu.yaml (the same config class and `main` as the CLI) in a
temporary runs folder and reports:

* the validation loss at the end (nanoGPT reports about 1.88 for this setting, estimated like
  here from eval_iters=20 random batches), plus the loss over the whole validation split;
* training tokens/s (optimiser steps only);
* sampling tokens/s for 1,000 new tokens with and without the KV cache. The trained model's
  context window is 64 tokens; past it both samplers recompute the cropped window for every
  token (exact, see gen_core/transformer.py), so the cache only speeds up the first window and
  the ratio stays near 1. The same measurement on an untrained model of the same width with a
  1,024-token window, where all 1,000 tokens fit, shows what the cache saves as text grows.

The last line printed is one JSON object. Timings on a shared machine are noisy: other jobs
running at the same time can slow any figure down.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with other jobs,
# spinning threads of two processes starve each other and a training step can take 10x longer.
# Must be set before torch (and with it libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gen_core.config import load_config  # noqa: E402
from gen_core.transformer import Transformer, TransformerConfig  # noqa: E402
from worldmodels.gen.text import (  # noqa: E402
    TrainTextConfig,
    load_text_model,
    main,
    read_tokens,
    split,
)

CONFIG = REPO / "configs" / "text_shakespeare_cpu.yaml"
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_VAL_LOSS = 1.88
SAMPLE_TOKENS = 1000


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


def time_sampling(model: Transformer, prompt: torch.Tensor, use_cache: bool):
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    out = model.generate(prompt, SAMPLE_TOKENS, 0.8, None, generator=gen, use_cache=use_cache)
    return SAMPLE_TOKENS / (time.perf_counter() - t0), out


def main_benchmark(overrides: list[str]) -> dict:
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="text_gen_bench_") as tmp:
        cfg = load_config(
            TrainTextConfig,
            CONFIG,
            [f"runs_dir={tmp}", "run_name=bench", f"data={DATA}", "progress=false", *overrides],
        )
        summary = main(cfg)
        model, tokenizer, _ = load_text_model(summary["checkpoint"], "cpu")
        _, tokens = read_tokens(DATA, tokenizer)
        _, val = split(tokens, cfg.val_fraction, cfg.block_size)
        val_full = full_val_loss(model, val, cfg.block_size)

    prompt = torch.tensor([tokenizer.encode("ROMEO:")])  # (1, 6)
    cached_tps, cached = time_sampling(model, prompt, use_cache=True)
    plain_tps, plain = time_sampling(model, prompt, use_cache=False)
    text = tokenizer.decode(cached[0].tolist())

    # all 1,000 tokens inside the window: the cache's saving grows with the context
    torch.manual_seed(0)
    long_model = Transformer(
        TransformerConfig(
            block_size=1024, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_embd=cfg.n_embd,
        )
    ).eval()  # fmt: skip
    long_cached_tps, _ = time_sampling(long_model, prompt, use_cache=True)
    long_plain_tps, _ = time_sampling(long_model, prompt, use_cache=False)

    print(f"--- 300 characters sampled with the KV cache (temperature 0.8) ---\n{text[:300]}\n---")
    return {
        "name": "text_gen",
        "val_loss": round(summary["val_loss"], 4),
        "nanogpt_val_loss": NANOGPT_VAL_LOSS,
        "val_loss_full_split": round(val_full, 4),
        "train_loss": round(summary["train_loss"], 4),
        "iterations": summary["step"],
        "overrides": overrides,
        "train_tokens_per_s": round(summary["train_tokens_per_s"]),
        "train_s": round(summary["train_seconds"], 1),
        "sample_tokens": SAMPLE_TOKENS,
        "sample_tokens_per_s_cache": round(cached_tps, 1),
        "sample_tokens_per_s_no_cache": round(plain_tps, 1),
        "kv_cache_speedup": round(cached_tps / plain_tps, 2),
        "kv_cache_same_tokens": bool(torch.equal(cached, plain)),
        "block1024_sample_tokens_per_s_cache": round(long_cached_tps, 1),
        "block1024_sample_tokens_per_s_no_cache": round(long_plain_tps, 1),
        "block1024_kv_cache_speedup": round(long_cached_tps / long_plain_tps, 2),
        "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "units": {
            "val_loss": "nats/token, mean of eval_iters=20 random validation batches",
            "val_loss_full_split": "nats/token over the whole validation split",
            "train_tokens_per_s": "tokens/s over optimiser steps only",
            "sample_tokens_per_s": "new tokens/s, batch 1, 1,000 tokens after a 6-token prompt",
            "kv_cache_speedup": "cached / uncached sampling tokens/s",
            "wall_s": "seconds",
        },
        "note": "2 shared CPU cores; other jobs ran at the same time, timings are noisy",
    }


if __name__ == "__main__":
    print(json.dumps(main_benchmark(sys.argv[1:])))
