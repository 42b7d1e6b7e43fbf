"""A decoder-only Transformer (GPT), written to read like nanoGPT's model.py.

The architecture is the Transformer decoder of Vaswani et al. 2017 ("Attention Is All You Need")
in the GPT-2 arrangement of Radford et al. 2019 ("Language Models are Unsupervised Multitask
Learners"): token + learned position embeddings, pre-LayerNorm residual blocks of causal
multi-head self-attention and a GELU MLP, a final LayerNorm, and an output head whose weight is
tied to the token embedding.

Two input modes share every block:

* token ids `(B, T)` -> logits over `vocab_size` (text generation);
* continuous vectors `(B, T, input_dim)` through a linear input projection, with a linear head
  of `output_dim` (e.g. a world model over concatenated (z, a) vectors); the loss is then MSE.

Generation keeps a per-layer key/value cache, so that inside the context window each new token
costs one position's worth of compute (plus attention over the cached keys) instead of a forward
pass over everything so far. What happens once the text outgrows the window depends on positions:

* learned *absolute* positions (GPT-2, nanoGPT; the default): every cached key depends on its
  position in the window, so a full cache cannot be rolled exactly. `generate` then recomputes
  the cropped window (the last `block_size` tokens) in one pass per token, which is exactly what a
  sampler without a cache does: the cache saves inside the first window and costs nothing after.
* rotary positions (`rotary=True`, Su et al. 2021, "RoFormer"): a query and a key score by their
  offset alone, so keys stay valid however far the text runs. Past the window the cache becomes a
  ring of the last `block_size` positions per layer (the rolling buffer of Mistral 7B's
  sliding-window attention, Jiang et al. 2023): each new token costs one position for ever. The
  model then reads a long text with sliding-window attention, every position over the last
  `block_size` ones in every layer, which is what `hidden` computes for a long sequence without a
  cache; the sampler without a cache recomputes the n_layer * (block_size - 1) + 1 tokens that
  reach the newest one, so both samplers give the same tokens.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class TransformerConfig:
    block_size: int = 64  # context window: the most positions the model attends over
    vocab_size: int = (
        65  # token ids are in [0, vocab_size); unused when input and output are continuous
    )
    n_layer: int = 4  # number of Transformer blocks
    n_head: int = 4  # attention heads per block; n_embd must divide by it
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    bias: bool = False  # biases in Linear layers and LayerNorms (False: a bit better and faster)
    input_dim: int = 0  # 0: inputs are token ids; > 0: inputs are vectors of this size
    output_dim: int = 0  # 0: logits over vocab_size; > 0: a linear head of this size (MSE loss)
    rotary: bool = False  # rotary position encoding (RoFormer) instead of learned positions

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class KVCache:
    """Keys and values of every layer for the positions seen so far, in preallocated buffers.

    Buffers are sized for the whole context window up front so that appending a position is an
    in-place write, not a `torch.cat` that copies the whole cache on every token.
    """

    def __init__(self, config: TransformerConfig, batch_size: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions already cached (the same for every layer)
        self.capacity = config.block_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store `k`, `v` (B, nh, T, hs) after the cached positions; return all keys and values.

        Past the capacity the buffers are a ring (rotary positions only, one position at a time):
        the new position overwrites the oldest, and all `capacity` slots are returned. Their
        order does not matter: rotary keys carry their own position, and one new query may see
        every key in the window."""
        start, end = self.length, self.length + k.size(2)
        if end <= self.capacity:
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, end, hs)
        slot = start % self.capacity
        self.k[layer][:, :, slot : slot + 1] = k
        self.v[layer][:, :, slot : slot + 1] = v
        return self.k[layer], self.v[layer]  # (B, nh, capacity, hs)

    def reset(self) -> None:
        self.length = 0


def rotary_tables(pos: torch.Tensor, head_size: int, base: float = 10000.0):
    """cos and sin of RoFormer's rotation angles (Su et al. 2021) at positions `pos` (...,):
    each (..., head_size / 2)."""
    freqs = base ** (-torch.arange(0, head_size, 2, device=pos.device) / head_size)  # (hs / 2,)
    angles = pos.to(torch.float32)[..., None] * freqs  # (..., hs / 2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) pair of x's last dim by its angle: x (..., T, hs),
    cos and sin broadcastable to (..., T, hs / 2). A query at position i and a key at j then
    score by their offset i - j alone, so cached keys stay valid however far a sequence runs."""
    a, b = x.chunk(2, dim=-1)  # (..., T, hs / 2) each
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ):
        """`mask` (T, T), True where a query may attend to a key, replaces the causal mask."""
        B, T, C = x.size()  # batch, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # one new query may see every cached position; is_causal would align the mask to the
            # top-left corner and let it see only the first key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # several new queries after cached ones: query i sits at position past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ):
        x = x + self.attn(self.ln_1(x), cache, layer, rope, mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tokens_in = config.input_dim == 0
        self.tokens_out = config.output_dim == 0
        if self.tokens_in:
            wte = nn.Embedding(config.vocab_size, config.n_embd)
        else:
            wte = nn.Linear(config.input_dim, config.n_embd, bias=config.bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=wte,
                # rotary positions live in the attention, not in the residual stream
                wpe=None if config.rotary else nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        out_dim = config.vocab_size if self.tokens_out else config.output_dim
        self.lm_head = nn.Linear(config.n_embd, out_dim, bias=False)
        if self.tokens_in and self.tokens_out:
            # weight tying (Press & Wolf 2017): the input embedding doubles as the output head
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so that the residual
        # stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out by default, as in nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-LayerNorm residual stream (B, T, C) for `idx` after any cached positions."""
        B, T = idx.shape[:2]
        past = cache.length if cache is not None else 0
        # With rotary positions and no cache, a longer sequence is read with a sliding window:
        # each position attends over the last block_size ones (what a ring of keys holds).
        band = self.config.rotary and cache is None and T > self.config.block_size
        # ... and with a cache, one position at a time past the window (the ring, see KVCache)
        ring = self.config.rotary and cache is not None and T == 1
        if past + T > self.config.block_size and not (band or ring):
            raise ValueError(
                f"{past + T} positions exceed the context window of {self.config.block_size}"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.rotary:
            rope = rotary_tables(pos, self.config.n_embd // self.config.n_head)  # (T, hs / 2)
        else:
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        x = self.transformer.drop(x)  # (B, T, C)
        band_mask = None
        if band:
            i = torch.arange(T, device=idx.device)
            offset = i[:, None] - i[None, :]  # (T, T) query - key
            band_mask = (offset >= 0) & (offset < self.config.block_size)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, rope, band_mask)  # (B, T, C)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ):
        """Outputs for every position, and the loss if `targets` are given.

        Args:
            idx: token ids (B, T), or vectors (B, T, input_dim) in continuous mode.
            targets: next token ids (B, T) (-1 is ignored), or vectors (B, T, output_dim).
            cache: a KVCache holding earlier positions; `idx` continues after them.

        Returns:
            (logits, loss): logits (B, T, vocab_size or output_dim); loss a scalar or None.
        """
        x = self.hidden(idx, cache)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            if self.tokens_out:
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
                )
            else:
                loss = F.mse_loss(logits, targets)
        return logits, loss

    def configure_optimizer(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float]
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings only, not on biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights appear once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = {}
        # the fused kernel does the whole update in one pass instead of a dozen foreach ops
        if "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T) and return (B, T + new).

        Learned positions: each step conditions on the last `block_size` tokens. Rotary: on a
        sliding window of `block_size` in every layer. With `use_cache`, keys and values of
        earlier positions are reused (see the module docstring for what happens past the window),
        and both paths sample from the same distribution: for the same `generator`, the same
        tokens. `temperature=0` picks the most likely token; `top_k` keeps only the k most likely
        tokens before sampling.
        """
        if not (self.tokens_in and self.tokens_out):
            raise ValueError("generate needs a token model (input_dim == 0 and output_dim == 0)")
        was_training = self.training
        self.eval()  # no dropout while sampling
        cache = None
        if use_cache:
            cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype)
        step = self._sample_rotary if self.config.rotary else self._sample_learned
        try:
            return step(idx, max_new_tokens, temperature, top_k, generator, cache)
        finally:
            self.train(was_training)

    def _sample_learned(self, idx, max_new_tokens, temperature, top_k, generator, cache):
        """`generate` for learned positions: the cache inside the first window, then recompute."""
        block = self.config.block_size
        for _ in range(max_new_tokens):
            if cache is not None and 0 < cache.length < block:
                x = self.hidden(idx[:, -1:], cache)  # (B, 1, C): only the newest token
            else:
                # the prompt, or every step once the window is full: the cropped window in one
                # pass. Its keys and values are cached only while a next token still fits the
                # window; after that each step shifts every position, so none can be reused
                fill = cache if cache is not None and idx.size(1) < block else None
                if fill is not None:
                    fill.reset()
                x = self.hidden(idx[:, -block:], fill)  # (B, T, C)
            logits = self.lm_head(x[:, -1, :])  # (B, V): only the last position is needed
            idx_next = _sample(logits, temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx

    def _sample_rotary(self, idx, max_new_tokens, temperature, top_k, generator, cache):
        """`generate` for rotary positions: sliding-window attention, with a ring cache."""
        # tokens that can reach the newest one through n_layer windows of block_size
        reach = self.config.n_layer * (self.config.block_size - 1) + 1
        if cache is not None:
            # the prompt's reach: a first window in one pass, the rest into the ring one by one
            ctx = idx[:, -reach:]  # (B, <= reach)
            first = min(ctx.size(1), self.config.block_size)
            x = self.hidden(ctx[:, :first], cache)  # (B, first, C)
            for t in range(first, ctx.size(1)):
                x = self.hidden(ctx[:, t : t + 1], cache)  # (B, 1, C)
        for i in range(max_new_tokens):
            if cache is None:
                x = self.hidden(idx[:, -reach:])  # (B, <= reach, C): banded past the window
            elif i > 0:
                x = self.hidden(idx[:, -1:], cache)  # (B, 1, C): only the newest token
            logits = self.lm_head(x[:, -1, :])  # (B, V): only the last position is needed
            idx_next = _sample(logits, temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token id per row (B, 1) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
