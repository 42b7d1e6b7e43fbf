"""Mixture-density heads and the one-step protocol every latent world model implements.

A world model M over a latent sequence reads [z_t, a_t] at each step and predicts z_{t+1} as a
mixture of Gaussians (Bishop 1994, "Mixture Density Networks"; Graves 2013; one mixture per
latent dimension, as World Models, Ha & Schmidhuber 2018), the reward r_t of that step and
whether that step ended the episode. `MDNHeads` maps the sequence model's features to those
three predictions and scores them; the MDN-RNN (`gen_core/mdnrnn.py`, an LSTM) and the
Transformer M (`gen_core/mdn_transformer.py`) differ only in how they make the features.

The step protocol (`StepModel`) is how anything *runs* such a model, one step at a time for a
batch of rollouts: `initial_state(B)`, `observe(state, z, a)` (a real step read, nothing drawn),
`step(state, z, a, temperature, generator)` -> `WorldStep` (a drawn next z, reward, end
probability, new state), and `features(state)` (what a controller reads: the LSTM's h, the
Transformer's last output). States are `BatchState`s: dataclasses of batch-first tensors that can
be indexed, repeated and written row by row, so a dream bank, a vector env's autoreset and a
population of rollouts all handle any model's state the same way.

Room for a diffusion M: its state would be the window of past latents (and any cache) as a
`BatchState`, and `step` would run its sampler (DDIM steps conditioned on that window and a_t)
to draw z_{t+1}, with reward and end heads on the denoiser's conditioning features; `observe`
appends a real z to the window. Nothing that consumes the protocol needs to change.

Sampling temperature tau, exactly as World Models: mixture logits are divided by tau and each
component's standard deviation is multiplied by sqrt(tau).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# Ends are rare (one step in hundreds): their BCE terms weigh this much more than other steps'.
END_POS_WEIGHT = 10.0


@dataclass
class MDNHeadsConfig:
    z_dim: int = 32  # size of the latent z modelled
    features: int = 256  # width of the sequence model's output that the heads read
    n_mixtures: int = 5  # Gaussians per latent dimension
    reward_head: bool = True  # predict the reward of each step
    done_head: bool = True  # predict whether each step ends the episode (Bernoulli logit)
    min_log_sigma: float = -7.0  # clamp on component log-stds, for a finite NLL


@dataclass
class MDNOutput:
    logit_pi: torch.Tensor  # (B, T, z_dim, K) mixture logits
    mu: torch.Tensor  # (B, T, z_dim, K) component means
    log_sigma: torch.Tensor  # (B, T, z_dim, K) component log-stds
    reward: torch.Tensor | None  # (B, T) predicted reward
    done_logit: torch.Tensor | None  # (B, T) predicted end logit


class MDNHeads(nn.Module):
    """Mixture of z_{t+1}, reward and end, from features (B, T, features)."""

    def __init__(self, config: MDNHeadsConfig):
        super().__init__()
        c = self.config = config
        self.mdn = nn.Linear(c.features, 3 * c.z_dim * c.n_mixtures)
        self.reward = nn.Linear(c.features, 1) if c.reward_head else None
        self.done = nn.Linear(c.features, 1) if c.done_head else None

    def forward(self, out: torch.Tensor) -> MDNOutput:
        c = self.config
        B, T, _ = out.shape
        params = self.mdn(out).view(B, T, 3, c.z_dim, c.n_mixtures)  # (B, T, 3, z_dim, K)
        logit_pi, mu, log_sigma = params.unbind(dim=2)  # (B, T, z_dim, K) each
        log_sigma = log_sigma.clamp(min=c.min_log_sigma)
        reward = self.reward(out).squeeze(-1) if self.reward is not None else None  # (B, T)
        done = self.done(out).squeeze(-1) if self.done is not None else None  # (B, T)
        return MDNOutput(logit_pi, mu, log_sigma, reward, done)

    def loss(
        self,
        out: MDNOutput,
        z_next: torch.Tensor,
        reward: torch.Tensor | None = None,
        done: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mixture NLL of z_{t+1} + reward MSE + end BCE (ends weighted by END_POS_WEIGHT).

        Args:
            z_next: (B, T, z_dim) targets z_{t+1}.
            reward: (B, T) reward targets (needed if the reward head exists).
            done: (B, T) 0/1 episode-end flags (needed if the done head exists).
            mask: (B, T) 1 for real steps, 0 for padding.

        Returns `loss` (the total to minimise), `nll` (mean per latent dimension), and
        `reward_mse`, `done_bce` where the heads exist.
        """
        if mask is None:
            mask = torch.ones(z_next.shape[:2], device=z_next.device)
        mask = mask.to(z_next.dtype)
        n = mask.sum().clamp(min=1.0)
        nll = mixture_nll(out.logit_pi, out.mu, out.log_sigma, z_next)  # (B, T, z_dim)
        nll = (nll.mean(-1) * mask).sum() / n
        terms = {"nll": nll}
        total = nll
        if out.reward is not None and reward is not None:
            terms["reward_mse"] = (((out.reward - reward) ** 2) * mask).sum() / n
            total = total + terms["reward_mse"]
        if out.done_logit is not None and done is not None:
            bce = F.binary_cross_entropy_with_logits(
                out.done_logit,
                done.to(out.done_logit.dtype),
                reduction="none",
                pos_weight=torch.tensor(END_POS_WEIGHT, device=z_next.device),
            )
            terms["done_bce"] = (bce * mask).sum() / n
            total = total + terms["done_bce"]
        terms["loss"] = total
        return terms


def mixture_nll(
    logit_pi: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """-log sum_k pi_k N(x | mu_k, sigma_k) per dimension: (..., D, K), x (..., D) -> (..., D)."""
    x = x.unsqueeze(-1)  # (..., D, 1)
    log_norm = -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - LOG_SQRT_2PI  # (..., D, K)
    return -torch.logsumexp(F.log_softmax(logit_pi, dim=-1) + log_norm, dim=-1)  # (..., D)


def sample_mixture(
    logit_pi: torch.Tensor,
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x from the per-dimension mixture at a temperature (World Models' rule).

    Logits are divided by tau; each component's std is multiplied by sqrt(tau). At tau -> 0 this
    returns the mean of the most likely component. Shapes (..., D, K) -> (..., D).

    Random draws: one uniform per dimension picks the component, then one normal per dimension
    (`pick_components`, `add_noise`); the LSTM's fused step draws the same from one generator.
    """
    # Components on dim -2: softmax and cumsum along a short last dim are several times slower.
    k = pick_components(logit_pi.transpose(-1, -2), temperature, generator)  # (..., 1, D)
    k = k.transpose(-1, -2)  # (..., D, 1)
    mean = mu.gather(-1, k).squeeze(-1)  # (..., D)
    if temperature <= 0:
        return mean
    return add_noise(mean, log_sigma.gather(-1, k).squeeze(-1), temperature, generator)


def pick_components(
    logit_pi: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Index of the mixture component drawn per row at `temperature`: logits (..., K, D)
    -> (..., 1, D) int64; the likeliest component at temperature 0 (no draw).

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


def add_noise(
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


# ------------------------------------------------------------------------------ step protocol


class BatchState:
    """A batch of model states: a dataclass whose fields are batch-first tensors.

    Subclasses only declare their fields; rows are selected, repeated, written and moved the
    same way for every model.
    """

    def _map(self, fn) -> BatchState:
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    def take(self, idx: torch.Tensor) -> BatchState:
        """The states of rows `idx` (a new batch)."""
        return self._map(lambda x: x[idx])

    def repeat_interleave(self, n: int) -> BatchState:
        """Each row `n` times in a row: (B, ...) -> (B n, ...)."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def put(self, idx: torch.Tensor, other: BatchState) -> None:
        """Overwrite rows `idx` with `other`'s rows, in place."""
        for f in dataclasses.fields(self):
            getattr(self, f.name)[idx] = getattr(other, f.name)

    def to(self, device) -> BatchState:
        return self._map(lambda x: x.to(device))

    def clone(self) -> BatchState:
        return self._map(lambda x: x.clone())

    @classmethod
    def cat(cls, states: list[BatchState]) -> BatchState:
        return cls(
            **{
                f.name: torch.cat([getattr(s, f.name) for s in states])
                for f in dataclasses.fields(cls)
            }
        )


@dataclass
class WorldStep:
    z: torch.Tensor  # (B, z_dim) the drawn next latent
    reward: torch.Tensor  # (B,) predicted reward of the step (zeros without a reward head)
    end_prob: torch.Tensor  # (B,) predicted probability that the step ended the episode
    state: BatchState  # the state after the step


class StepModel(Protocol):
    """What runs a world model one step at a time (see the module docstring)."""

    z_dim: int
    action_dim: int
    feature_dim: int  # width of `features(state)`

    def initial_state(self, batch: int) -> BatchState: ...

    def observe(self, state: BatchState, z: torch.Tensor, action: torch.Tensor) -> BatchState: ...

    def step(
        self,
        state: BatchState,
        z: torch.Tensor,
        action: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
    ) -> WorldStep: ...

    def features(self, state: BatchState) -> torch.Tensor: ...
