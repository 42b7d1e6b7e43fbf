"""MDN-RNN: an LSTM whose output parameterises a mixture of Gaussians over the next latent.

The memory model M of World Models (Ha & Schmidhuber, 2018, https://arxiv.org/abs/1803.10122),
after Graves (2013), "Generating Sequences With Recurrent Neural Networks", and Bishop (1994),
"Mixture Density Networks". The mixture is factored per latent dimension as in World Models:
each of the `z_dim` dimensions has its own K-component mixture. With `joint_mixture` it is one
K-component mixture of diagonal Gaussians over the whole of z, as in Bishop's MDN: a draw picks
one component for every dimension, so a sampled z is one coherent mode (per-dimension picks can
mix parts of different futures into a z no frame has). Optional heads predict the reward
of the transition just taken and whether the episode ends, so M alone can serve as a dream env.

Sampling temperature tau, exactly as World Models: mixture logits are divided by tau and each
component's standard deviation is multiplied by sqrt(tau).

At step t the model reads [z_t, a_t] and predicts z_{t+1}, r_t (the reward of that step) and
done_t (whether that step ended the episode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class MDNRNNConfig:
    z_dim: int = 32  # size of the latent z modelled
    action_dim: int = 3  # size of the action fed with each z
    hidden: int = 256  # LSTM hidden units (h and c each)
    n_mixtures: int = 5  # Gaussians per latent dimension (per z with joint_mixture)
    joint_mixture: bool = False  # one mixture over all of z instead of one per dimension
    reward_head: bool = True  # predict the reward of each step
    done_head: bool = True  # predict whether each step ends the episode (Bernoulli logit)
    reward_weight: float = 1.0  # weight of the reward MSE in the loss
    done_weight: float = 1.0  # weight of the done BCE in the loss
    done_pos_weight: float = 1.0  # weight of positive (done) steps in the BCE: ends are rare
    done_reward: float = 0.0  # reward a rollout earns on the step the done head ends it
    min_log_sigma: float = -7.0  # clamp on component log-stds, for a finite NLL


@dataclass
class MDNOutput:
    logit_pi: torch.Tensor  # (B, T, z_dim, K) mixture logits; (B, T, 1, K) with joint_mixture
    mu: torch.Tensor  # (B, T, z_dim, K) component means
    log_sigma: torch.Tensor  # (B, T, z_dim, K) component log-stds
    reward: torch.Tensor | None  # (B, T) predicted reward
    done_logit: torch.Tensor | None  # (B, T) predicted done logit
    hidden: torch.Tensor  # (B, T, hidden) LSTM outputs h_t
    state: tuple[torch.Tensor, torch.Tensor]  # (h, c), each (1, B, hidden), after the last step


class MDNRNN(nn.Module):
    def __init__(self, config: MDNRNNConfig):
        super().__init__()
        self.config = config
        c = config
        self.lstm = nn.LSTM(c.z_dim + c.action_dim, c.hidden, batch_first=True)
        self.mdn = nn.Linear(c.hidden, (self.mixture_rows + 2 * c.z_dim) * c.n_mixtures)
        self.reward = nn.Linear(c.hidden, 1) if c.reward_head else None
        self.done = nn.Linear(c.hidden, 1) if c.done_head else None

    @property
    def mixture_rows(self) -> int:
        """Rows of mixture weights: one per latent dimension, or one for all with joint_mixture."""
        return 1 if self.config.joint_mixture else self.config.z_dim

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c) for a batch, each (1, B, hidden)."""
        zeros = torch.zeros(1, batch, self.config.hidden, device=device)
        return zeros, zeros.clone()

    def forward(
        self,
        z: torch.Tensor,
        action: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MDNOutput:
        """Run over a whole sequence (or one step with T = 1).

        Args:
            z: (B, T, z_dim) latents z_t.
            action: (B, T, action_dim) actions a_t.
            state: (h, c) to start from, each (1, B, hidden); zeros if None.
        """
        x = torch.cat([z, action], dim=-1)  # (B, T, z_dim + action_dim)
        out, state = self.lstm(x, state)  # (B, T, hidden)
        return self._heads(out, state)

    def _heads(self, out: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> MDNOutput:
        """Mixture, reward and done heads on LSTM outputs `out` (B, T, hidden)."""
        c = self.config
        B, T, _ = out.shape
        params = self.mdn(out)  # (B, T, (rows + 2 z_dim) K)
        rows, K = self.mixture_rows, c.n_mixtures
        logit_pi = params[..., : rows * K].view(B, T, rows, K)  # (B, T, rows, K)
        mu, log_sigma = params[..., rows * K :].view(B, T, 2, c.z_dim, K).unbind(dim=2)
        log_sigma = log_sigma.clamp(min=c.min_log_sigma)
        reward = self.reward(out).squeeze(-1) if self.reward is not None else None  # (B, T)
        done = self.done(out).squeeze(-1) if self.done is not None else None  # (B, T)
        return MDNOutput(logit_pi, mu, log_sigma, reward, done, out, state)

    def step(
        self,
        z: torch.Tensor,
        action: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MDNOutput:
        """One step for a batch: z (B, z_dim), action (B, action_dim); outputs keep T = 1.

        Same maths as `forward` with T = 1, but through one LSTM cell call: for a single step the
        sequence kernel's setup costs more than the step itself.
        """
        if state is None:
            state = self.initial_state(z.shape[0], z.device)
        lstm = self.lstm
        x = torch.cat([z, action], dim=-1)  # (B, z_dim + action_dim)
        h, c = torch.lstm_cell(
            x,
            (state[0][0], state[1][0]),
            lstm.weight_ih_l0,
            lstm.weight_hh_l0,
            lstm.bias_ih_l0,
            lstm.bias_hh_l0,
        )  # (B, hidden) each
        return self._heads(h.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0)))

    def stepper(self, dtype: torch.dtype = torch.float32) -> MDNStepper:
        """A snapshot of this model's weights laid out for many fast steps (see `MDNStepper`)."""
        return MDNStepper(self, dtype)

    def sample(
        self,
        out: MDNOutput,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw z_{t+1} from an output's mixtures at `temperature`: (B, T, z_dim)."""
        return sample_mixture(out.logit_pi, out.mu, out.log_sigma, temperature, generator)

    def loss(
        self,
        out: MDNOutput,
        z_next: torch.Tensor,
        reward: torch.Tensor | None = None,
        done: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mixture NLL of z_{t+1} + weighted reward MSE + weighted done BCE.

        Args:
            z_next: (B, T, z_dim) targets z_{t+1}.
            reward: (B, T) rewards r_t (needed if the reward head exists).
            done: (B, T) 0/1 episode-end flags (needed if the done head exists).
            mask: (B, T) 1 for real steps, 0 for padding.

        Returns a dict with `loss` (the total to minimise), `nll` (mean per latent dimension),
        and `reward_mse`, `done_bce` where the heads exist.
        """
        c = self.config
        if mask is None:
            mask = torch.ones(z_next.shape[:2], device=z_next.device)
        mask = mask.to(z_next.dtype)
        n = mask.sum().clamp(min=1.0)
        nll = mixture_nll(out.logit_pi, out.mu, out.log_sigma, z_next)  # (B, T, z_dim)
        nll = (nll.mean(-1) * mask).sum() / n
        terms = {"nll": nll}
        total = nll
        if out.reward is not None and reward is not None:
            mse = (((out.reward - reward) ** 2) * mask).sum() / n
            terms["reward_mse"] = mse
            total = total + c.reward_weight * mse
        if out.done_logit is not None and done is not None:
            pos_weight = torch.tensor(c.done_pos_weight, device=z_next.device)
            bce = F.binary_cross_entropy_with_logits(
                out.done_logit,
                done.to(out.done_logit.dtype),
                reduction="none",
                pos_weight=pos_weight,
            )
            bce = (bce * mask).sum() / n
            terms["done_bce"] = bce
            total = total + c.done_weight * bce
        terms["loss"] = total
        return terms


def mixture_nll(
    logit_pi: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """-log sum_k pi_k N(x | mu_k, sigma_k) per dimension.

    logit_pi, mu, log_sigma: (..., D, K); x: (..., D). Returns (..., D).
    A joint mixture has logit_pi (..., 1, K): -log sum_k pi_k prod_d N(x_d | mu_dk, sigma_dk),
    returned as its per-dimension share (..., D), so the sum over D is the NLL of x either way.
    """
    x = x.unsqueeze(-1)  # (..., D, 1)
    log_norm = -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - LOG_SQRT_2PI  # (..., D, K)
    log_pi = F.log_softmax(logit_pi, dim=-1)  # (..., D or 1, K)
    if logit_pi.shape[-2] == 1 and mu.shape[-2] > 1:
        joint = -torch.logsumexp(log_pi[..., 0, :] + log_norm.sum(dim=-2), dim=-1)  # (...,)
        return (joint / mu.shape[-2]).unsqueeze(-1).expand(mu.shape[:-1])  # (..., D)
    return -torch.logsumexp(log_pi + log_norm, dim=-1)  # (..., D)


def sample_mixture(
    logit_pi: torch.Tensor,
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x from the per-dimension mixture at a temperature (World Models' rule).

    Logits are divided by tau; each component's std is multiplied by sqrt(tau). At tau -> 0 this
    returns the mean of the most likely component. Shapes (..., D, K) -> (..., D); a joint
    mixture's logit_pi is (..., 1, K) and its one pick serves every dimension.

    Random draws: one uniform per mixture row picks the component, then one normal per dimension
    (`MDNStepper.sample` draws the same, so both give the same samples from one generator).
    """
    # Components on dim -2: softmax and cumsum along a short last dim are several times slower.
    k = _pick_components(logit_pi.transpose(-1, -2), temperature, generator)  # (..., 1, D or 1)
    k = k.transpose(-1, -2).expand(*mu.shape[:-1], 1)  # (..., D, 1)
    mean = mu.gather(-1, k).squeeze(-1)  # (..., D)
    if temperature <= 0:
        return mean
    return _add_noise(mean, log_sigma.gather(-1, k).squeeze(-1), temperature, generator)


def _pick_components(
    logit_pi: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Index of the mixture component drawn per row at `temperature`: logits (..., K, R)
    -> (..., 1, R) int64; the likeliest component at temperature 0 (no draw).

    Inverse-CDF sampling with one uniform per row: far cheaper than `torch.multinomial`
    over many rows of K (which dominated a dream step), same distribution.
    """
    if temperature <= 0:
        return logit_pi.argmax(dim=-2, keepdim=True)
    if temperature != 1.0:
        logit_pi = logit_pi / temperature
    probs = F.softmax(logit_pi, dim=-2)  # (..., K, D)
    # The last component takes whatever rounding leaves above the running sum, so k <= K - 1.
    cdf = probs[..., :-1, :].cumsum(dim=-2)  # (..., K - 1, D)
    shape = cdf.shape[:-2] + (1, cdf.shape[-1])
    u = torch.rand(shape, generator=generator, device=cdf.device, dtype=cdf.dtype)  # (..., 1, D)
    return (cdf <= u).sum(dim=-2, keepdim=True)  # (..., 1, D) components whose cdf u passed


def _add_noise(
    mean: torch.Tensor,
    log_sigma: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """mean + sigma sqrt(tau) eps, eps ~ N(0, 1): mean and log_sigma (..., D) of the picked
    components (`log_sigma` is overwritten)."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if temperature != 1.0:
        noise.mul_(math.sqrt(temperature))
    return torch.addcmul(mean, log_sigma.exp_(), noise)


class MDNStepper:
    """One step of M for a rollout loop, from a snapshot of the model's weights.

    Two matmuls a step: [z, a, h] -> all four LSTM gates at once, and h -> mixture, reward and
    done together. The weights are laid out for that once, so a step is a few ops on whole
    batches (what a batched dream is made of). `dtype=torch.bfloat16` runs both matmuls in
    bfloat16 (state, gates and sampling stay float32): on CPUs with bf16 dot products the
    matmuls run 2-2.5x faster and a 1024-rollout dream about 1.6x (AVX512-BF16, one thread),
    but the dream moves slightly (mean returns shifted by up to ~2% for some policies).

    Inference only (no gradients); rebuild it after the weights change.
    """

    @torch.no_grad()
    def __init__(self, model: MDNRNN, dtype: torch.dtype = torch.float32):
        c = model.config
        H, D, K, R = c.hidden, c.z_dim, c.n_mixtures, model.mixture_rows
        self.config, self.dtype, self.rows = c, dtype, R
        lstm = model.lstm
        # Gates from PyTorch's order (i, f, g, o) to (i, f, o, g), the cell input g's rows
        # doubled: tanh(x) = 2 sigmoid(2x) - 1, and one sigmoid over all gates is much cheaper
        # than a sigmoid and a tanh (tanh is slow on CPU).
        H_ = torch.arange(H, device=lstm.weight_ih_l0.device)
        order = torch.cat([H_, H + H_, 3 * H + H_, 2 * H + H_])  # (4H,)
        scale = torch.ones(4 * H, 1, device=order.device)
        scale[3 * H :] = 2.0
        w = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1)  # (4H, z + a + H)
        # Kept (out, in) and used transposed: MKL runs x @ w.t() faster than a (in, out) copy.
        self.w_gates = (w[order] * scale).to(dtype)  # (4H, z + a + H)
        b = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[order] * scale[:, 0]
        self.b_gates = b.to(dtype)  # (4H,)
        # Head rows: logits as (K, R) (R = D, or 1 for a joint mixture), then (mu, log_sigma) as
        # (K, 2, D), so reductions over components run along whole rows and the picked pair is
        # one gather; then reward and done where those heads exist.
        logit_w = model.mdn.weight[: R * K].view(R, K, H)
        pair_w = model.mdn.weight[R * K :].view(2, D, K, H)
        logit_b = model.mdn.bias[: R * K].view(R, K)
        pair_b = model.mdn.bias[R * K :].view(2, D, K)
        ws = [
            logit_w.transpose(0, 1).reshape(K * R, H),  # (K R, H) logits
            pair_w.permute(2, 0, 1, 3).reshape(2 * K * D, H),  # (K 2 D, H) mu, log_sigma
        ]
        bs = [logit_b.t().reshape(K * R), pair_b.permute(2, 0, 1).reshape(2 * K * D)]
        for head in (model.reward, model.done):
            if head is not None:
                ws.append(head.weight)  # (1, H)
                bs.append(head.bias)  # (1,)
        self.w_head = torch.cat(ws).to(dtype)  # (K R + 2 K D [+ 1] [+ 1], H)
        self.b_head = torch.cat(bs).to(dtype)
        n_mdn = K * R + 2 * K * D
        self.reward_col = n_mdn if model.reward is not None else None
        self.done_col = n_mdn + (model.reward is not None) if model.done is not None else None

    def lstm(
        self, z: torch.Tensor, action: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c) after one LSTM step on [z, action]: all (B, .) float32."""
        x = torch.cat([z, action, h], dim=-1).to(self.dtype)  # (B, z + a + H)
        gates = torch.addmm(self.b_gates, x, self.w_gates.t()).float()  # (B, 4H)
        i, f, o, s = gates.sigmoid_().chunk(4, dim=1)  # (B, H) each; tanh(g) = 2 s - 1
        c = (c * f).sub_(i).addcmul_(i, s, value=2.0)  # (B, H) f c + i tanh(g)
        tanh_c = torch.sigmoid(c * 2.0).mul_(2.0).sub_(1.0)  # (B, H)
        return o * tanh_c, c

    def heads(self, h: torch.Tensor) -> torch.Tensor:
        """All head outputs for h (B, hidden): (B, K R + 2 K D [+ 1] [+ 1]) float32."""
        return torch.addmm(self.b_head, h.to(self.dtype), self.w_head.t()).float()

    def sample(
        self,
        out: torch.Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """z_{t+1} (B, D) drawn from head outputs `out` as `sample_mixture` draws it."""
        c = self.config
        D, K, R = c.z_dim, c.n_mixtures, self.rows
        B = out.shape[0]
        logit_pi = out[:, : K * R].view(B, K, R)
        pairs = out[:, K * R : K * R + 2 * K * D].view(B, K, 2, D)  # (mu, log_sigma) per component
        k = _pick_components(logit_pi, temperature, generator).expand(B, 1, D)  # (B, 1, D)
        picked = pairs.gather(1, k.unsqueeze(2).expand(B, 1, 2, D))[:, 0]  # (B, 2, D)
        if temperature <= 0:
            return picked[:, 0]
        log_sigma = picked[:, 1].clamp(min=c.min_log_sigma)  # (B, D)
        return _add_noise(picked[:, 0], log_sigma, temperature, generator)

    def reward(self, out: torch.Tensor) -> torch.Tensor | None:
        """Predicted reward (B,) from head outputs; None without a reward head."""
        return None if self.reward_col is None else out[:, self.reward_col]

    def done_logit(self, out: torch.Tensor) -> torch.Tensor | None:
        """Predicted done logit (B,) from head outputs; None without a done head."""
        return None if self.done_col is None else out[:, self.done_col]
