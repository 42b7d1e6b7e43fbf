"""The Transformer M: a causal Transformer over [z_t, a_t] steps under the MDN heads.

The same job as the MDN-RNN (`gen_core/mdnrnn.py`: predict z_{t+1} as a per-dimension mixture
of Gaussians, the reward r_t and whether step t ended the episode), with gen_core's GPT
(`gen_core/transformer.py`) in place of the LSTM, as in the Transformer world models of IRIS
(Micheli et al. 2023, "Transformers are Sample-Efficient World Models") and TWM (Robine et al.
2023): each step is one position whose input is the vector [z_t, a_t].

Positions are rotary, so attention depends on the offset between steps only, and the model
attends over at most `window` past steps (its training chunks are no longer). A dream then keeps,
per rollout, the keys and values of its last `window` steps in a ring buffer: a step costs one
position's compute whatever the rollout's age, and every rollout can be at its own step (a
vector env restarts sub-envs at any time). `stepper()` gives that as the one-step protocol of
`gen_core/mdn.py`; the state C reads is the last position's output, the Transformer's h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen_core.mdn import BatchState, MDNHeads, MDNHeadsConfig, MDNOutput, WorldStep, sample_mixture
from gen_core.transformer import Transformer, TransformerConfig, apply_rotary, rotary_tables


@dataclass
class MDNTransformerConfig:
    z_dim: int = 32  # size of the latent z modelled
    action_dim: int = 3  # size of the action fed with each z
    n_embd: int = 128  # width of the residual stream (the h that C reads)
    n_layer: int = 2  # Transformer blocks
    head_size: int = 32  # width of one attention head (n_embd / head_size heads)
    window: int = 100  # past steps a position attends over (training chunks are no longer)
    n_mixtures: int = 5  # Gaussians per latent dimension
    reward_head: bool = True  # predict the reward of each step
    done_head: bool = True  # predict whether each step ends the episode


@dataclass
class RingState(BatchState):
    # Heads before layers: a layer's keys (B, n_head, window, head_size) are then one strided
    # batch of B * n_head matrices, which attention multiplies in place (with layers first,
    # every step copied each layer's whole ring: 57% of a step's time).
    k: torch.Tensor  # (B, n_head, n_layer, window, head_size) rotated keys of the last steps
    v: torch.Tensor  # (B, n_head, n_layer, window, head_size) their values
    pos: torch.Tensor  # (B,) int64 steps read so far (the next step's position)
    h: torch.Tensor  # (B, n_embd) output at the last step read (zeros before any)


class MDNTransformer(nn.Module):
    def __init__(self, config: MDNTransformerConfig):
        super().__init__()
        c = self.config = config
        if c.n_embd % c.head_size:
            raise ValueError(f"n_embd {c.n_embd} is not a multiple of head_size {c.head_size}")
        self.core = Transformer(
            TransformerConfig(
                block_size=c.window,
                n_layer=c.n_layer,
                n_head=c.n_embd // c.head_size,
                n_embd=c.n_embd,
                input_dim=c.z_dim + c.action_dim,
                output_dim=1,  # the core's own head is unused: the MDN heads read its features
                rotary=True,
            )
        )
        self.heads = MDNHeads(
            MDNHeadsConfig(c.z_dim, c.n_embd, c.n_mixtures, c.reward_head, c.done_head)
        )

    def forward(self, z: torch.Tensor, action: torch.Tensor, state=None) -> MDNOutput:
        """Predictions for whole sequences from an empty context: z (B, T, z_dim), action
        (B, T, action_dim); past `window` steps each position reads a sliding window, as the
        stepper's ring does."""
        if state is not None:
            raise ValueError("the Transformer M trains on sequences from an empty context")
        return self.heads(self.core.hidden(torch.cat([z, action], dim=-1)))  # (B, T, .)

    def loss(self, out: MDNOutput, *targets, **kw) -> dict[str, torch.Tensor]:
        return self.heads.loss(out, *targets, **kw)

    def stepper(self, dtype: torch.dtype = torch.float32) -> TransformerStepper:
        """The one-step protocol over this (live) model, in eval mode; float32 only."""
        if dtype != torch.float32:
            raise ValueError(f"the Transformer M steps in float32 only, not {dtype}")
        return TransformerStepper(self)


class TransformerStepper:
    """One step of the Transformer M for a batch of rollouts, each with its own ring of keys and
    values (the one-step protocol of `gen_core/mdn.py`). `observe` and `step` write the new
    step's keys and values into the given state's buffers: the state passed in is consumed."""

    def __init__(self, model: MDNTransformer):
        self.model = model.eval()
        c = model.config
        self.z_dim, self.action_dim, self.feature_dim = c.z_dim, c.action_dim, c.n_embd
        self.window, self.head_size = c.window, c.head_size
        self.n_head = c.n_embd // c.head_size
        self.device = next(model.parameters()).device

    def initial_state(self, batch: int) -> RingState:
        c = self.model.config
        shape = (batch, self.n_head, c.n_layer, self.window, self.head_size)
        return RingState(
            torch.zeros(shape, device=self.device),
            torch.zeros(shape, device=self.device),
            torch.zeros(batch, dtype=torch.long, device=self.device),
            torch.zeros(batch, c.n_embd, device=self.device),
        )

    def features(self, state: RingState) -> torch.Tensor:
        return state.h  # (B, n_embd)

    @torch.no_grad()
    def observe(self, state: RingState, z: torch.Tensor, action: torch.Tensor) -> RingState:
        """Read a real (z, action) per rollout: one position through every block."""
        core = self.model.core.transformer
        B, nh, hs, W = len(z), self.n_head, self.head_size, self.window
        rows = torch.arange(B, device=z.device)
        slot = state.pos % W  # (B,) where this step's key and value go
        filled = torch.clamp(state.pos + 1, max=W)  # (B,) slots holding a step after the write
        # A slot is attended to once written: (B, 1, 1, W) for the scores (B, nh, 1, W).
        valid = (torch.arange(W, device=z.device)[None] < filled[:, None])[:, None, None]
        cos, sin = rotary_tables(state.pos, hs)  # (B, hs / 2) each
        cos, sin = cos[:, None, None], sin[:, None, None]  # (B, 1, 1, hs / 2)
        x = core.wte(torch.cat([z, action], dim=-1))[:, None]  # (B, 1, C)
        for i, block in enumerate(core.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.n_embd, dim=2)  # (B, 1, C) each
            q = apply_rotary(q.view(B, 1, nh, hs).transpose(1, 2), cos, sin)  # (B, nh, 1, hs)
            k = apply_rotary(k.view(B, 1, nh, hs).transpose(1, 2), cos, sin)  # (B, nh, 1, hs)
            state.k[rows, :, i, slot] = k[:, :, 0]  # (B, nh, hs) into each row's slot
            state.v[rows, :, i, slot] = v.view(B, nh, hs)
            scores = (q @ state.k[:, :, i].transpose(-1, -2)) / math.sqrt(hs)  # (B, nh, 1, W)
            scores = scores.masked_fill(~valid, float("-inf"))
            y = F.softmax(scores, dim=-1) @ state.v[:, :, i]  # (B, nh, 1, hs)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, nh * hs))  # (B, 1, C)
            x = x + block.mlp(block.ln_2(x))  # (B, 1, C)
        h = core.ln_f(x)[:, 0]  # (B, C)
        return RingState(state.k, state.v, state.pos + 1, h)

    @torch.no_grad()
    def step(
        self,
        state: RingState,
        z: torch.Tensor,
        action: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> WorldStep:
        state = self.observe(state, z, action)
        out = self.model.heads(state.h[:, None])  # (B, 1, .)
        z_next = sample_mixture(
            out.logit_pi[:, 0], out.mu[:, 0], out.log_sigma[:, 0], temperature, generator
        )  # (B, z_dim)
        zeros = torch.zeros(len(z), device=z.device)
        reward = out.reward[:, 0] if out.reward is not None else zeros
        end = torch.sigmoid(out.done_logit[:, 0]) if out.done_logit is not None else zeros
        return WorldStep(z_next, reward, end, state)
