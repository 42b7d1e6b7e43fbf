"""MDN-RNN: an LSTM whose output parameterises a mixture of Gaussians over the next latent.

The memory model M of World Models (Ha & Schmidhuber, 2018, https://arxiv.org/abs/1803.10122),
after Graves (2013), "Generating Sequences With Recurrent Neural Networks", and Bishop (1994),
"Mixture Density Networks": one K-component mixture per latent dimension, plus heads for the
reward of the transition just taken and whether it ended the episode (`gen_core/mdn.py`), so M
alone can serve as a dream env.

At step t the model reads [z_t, a_t] and predicts z_{t+1}, r_t and done_t. `forward` runs whole
sequences (training); `stepper()` gives the one-step protocol of `gen_core/mdn.py`, a fused LSTM
step over a snapshot of the weights (what dreams, the real-env agent and M's free-running loss
run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gen_core.mdn import (
    BatchState,
    MDNHeads,
    MDNHeadsConfig,
    MDNOutput,
    WorldStep,
    add_noise,
    pick_components,
)


@dataclass
class MDNRNNConfig:
    z_dim: int = 32  # size of the latent z modelled
    action_dim: int = 3  # size of the action fed with each z
    hidden: int = 256  # LSTM hidden units (h and c each)
    n_mixtures: int = 5  # Gaussians per latent dimension
    reward_head: bool = True  # predict the reward of each step
    done_head: bool = True  # predict whether each step ends the episode


@dataclass
class LSTMState(BatchState):
    h: torch.Tensor  # (B, hidden)
    c: torch.Tensor  # (B, hidden)


class MDNRNN(nn.Module):
    def __init__(self, config: MDNRNNConfig):
        super().__init__()
        c = self.config = config
        self.lstm = nn.LSTM(c.z_dim + c.action_dim, c.hidden, batch_first=True)
        self.heads = MDNHeads(
            MDNHeadsConfig(c.z_dim, c.hidden, c.n_mixtures, c.reward_head, c.done_head)
        )

    def forward(
        self, z: torch.Tensor, action: torch.Tensor, state: LSTMState | None = None
    ) -> MDNOutput:
        """Predictions for a whole sequence: z (B, T, z_dim), action (B, T, action_dim),
        from `state` (zeros if None)."""
        x = torch.cat([z, action], dim=-1)  # (B, T, z_dim + action_dim)
        hc = None if state is None else (state.h[None], state.c[None])
        out, _ = self.lstm(x, hc)  # (B, T, hidden)
        return self.heads(out)

    def loss(self, out: MDNOutput, *targets, **kw) -> dict[str, torch.Tensor]:
        return self.heads.loss(out, *targets, **kw)

    def stepper(self, dtype: torch.dtype = torch.float32) -> LSTMStepper:
        """The one-step protocol over a snapshot of these weights (see `LSTMStepper`)."""
        return LSTMStepper(self, dtype)


class LSTMStepper:
    """One step of the MDN-RNN for a batch of rollouts, from a snapshot of the model's weights.

    Two matmuls a step: [z, a, h] -> all four LSTM gates at once, and h -> mixture, reward and
    done together. The weights are laid out for that once, so a step is a few ops on whole
    batches (what a batched dream is made of). `dtype=torch.bfloat16` runs both matmuls in
    bfloat16 (state, gates and sampling stay float32): on CPUs with bf16 dot products the
    matmuls run 2-2.5x faster, but the dream moves slightly.

    Inference only (no gradients); take a new one after the weights change.
    """

    @torch.no_grad()
    def __init__(self, model: MDNRNN, dtype: torch.dtype = torch.float32):
        c = model.config
        H, D, K = c.hidden, c.z_dim, c.n_mixtures
        self.z_dim, self.action_dim, self.feature_dim = D, c.action_dim, H
        self.n_mixtures, self.dtype = K, dtype
        self.min_log_sigma = model.heads.config.min_log_sigma
        lstm = model.lstm
        self.device = lstm.weight_ih_l0.device
        # Gates from PyTorch's order (i, f, g, o) to (i, f, o, g), the cell input g's rows
        # doubled: tanh(x) = 2 sigmoid(2x) - 1, and one sigmoid over all gates is much cheaper
        # than a sigmoid and a tanh (tanh is slow on CPU).
        H_ = torch.arange(H, device=self.device)
        order = torch.cat([H_, H + H_, 3 * H + H_, 2 * H + H_])  # (4H,)
        scale = torch.ones(4 * H, 1, device=self.device)
        scale[3 * H :] = 2.0
        w = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1)  # (4H, z + a + H)
        # Kept (out, in) and used transposed: MKL runs x @ w.t() faster than a (in, out) copy.
        self.w_gates = (w[order] * scale).to(dtype)  # (4H, z + a + H)
        self.b_gates = ((lstm.bias_ih_l0 + lstm.bias_hh_l0)[order] * scale[:, 0]).to(dtype)
        # Head rows: logits as (K, D), then (mu, log_sigma) as (K, 2, D), so reductions over
        # components run along whole rows and the picked pair is one gather; then reward and
        # done where those heads exist.
        heads = model.heads
        mdn_w = heads.mdn.weight.view(3, D, K, H)
        mdn_b = heads.mdn.bias.view(3, D, K)
        ws = [
            mdn_w[0].transpose(0, 1).reshape(K * D, H),  # (K D, H) logits
            mdn_w[1:].permute(2, 0, 1, 3).reshape(2 * K * D, H),  # (K 2 D, H) mu, log_sigma
        ]
        bs = [mdn_b[0].t().reshape(K * D), mdn_b[1:].permute(2, 0, 1).reshape(2 * K * D)]
        for head in (heads.reward, heads.done):
            if head is not None:
                ws.append(head.weight)  # (1, H)
                bs.append(head.bias)  # (1,)
        self.w_head = torch.cat(ws).to(dtype)  # (K D + 2 K D [+ 1] [+ 1], H)
        self.b_head = torch.cat(bs).to(dtype)
        n_mdn = 3 * K * D
        self.reward_col = n_mdn if heads.reward is not None else None
        self.done_col = n_mdn + (heads.reward is not None) if heads.done is not None else None

    def initial_state(self, batch: int) -> LSTMState:
        zeros = torch.zeros(batch, self.feature_dim, device=self.device)
        return LSTMState(zeros, zeros.clone())

    def features(self, state: LSTMState) -> torch.Tensor:
        return state.h  # (B, hidden)

    def observe(self, state: LSTMState, z: torch.Tensor, action: torch.Tensor) -> LSTMState:
        """The state after reading a real (z, action): (B, z_dim), (B, action_dim)."""
        x = torch.cat([z, action, state.h], dim=-1).to(self.dtype)  # (B, z + a + H)
        gates = torch.addmm(self.b_gates, x, self.w_gates.t()).float()  # (B, 4H)
        i, f, o, s = gates.sigmoid_().chunk(4, dim=1)  # (B, H) each; tanh(g) = 2 s - 1
        c = (state.c * f).sub_(i).addcmul_(i, s, value=2.0)  # (B, H) f c + i tanh(g)
        tanh_c = torch.sigmoid(c * 2.0).mul_(2.0).sub_(1.0)  # (B, H)
        return LSTMState(o * tanh_c, c)

    def step(
        self,
        state: LSTMState,
        z: torch.Tensor,
        action: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> WorldStep:
        """Read (z, action), draw z_{t+1} at `temperature`, predict reward and end."""
        state = self.observe(state, z, action)
        out = torch.addmm(self.b_head, state.h.to(self.dtype), self.w_head.t()).float()
        B, D, K = out.shape[0], self.z_dim, self.n_mixtures
        logit_pi = out[:, : K * D].view(B, K, D)
        pairs = out[:, K * D : 3 * K * D].view(B, K, 2, D)  # (mu, log_sigma) per component
        k = pick_components(logit_pi, temperature, generator)  # (B, 1, D)
        picked = pairs.gather(1, k.unsqueeze(2).expand(B, 1, 2, D))[:, 0]  # (B, 2, D)
        if temperature <= 0:
            z_next = picked[:, 0]
        else:
            log_sigma = picked[:, 1].clamp(min=self.min_log_sigma)  # (B, D)
            z_next = add_noise(picked[:, 0], log_sigma, temperature, generator)
        zeros = torch.zeros(B, device=out.device)
        reward = out[:, self.reward_col] if self.reward_col is not None else zeros
        end = torch.sigmoid(out[:, self.done_col]) if self.done_col is not None else zeros
        return WorldStep(z_next, reward, end, state)
