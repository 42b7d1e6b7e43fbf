"""MDN-RNN: an LSTM whose output parameterises a mixture of Gaussians over the next latent.

The memory model M of World Models (Ha & Schmidhuber, 2018, https://arxiv.org/abs/1803.10122),
after Graves (2013), "Generating Sequences With Recurrent Neural Networks", and Bishop (1994),
"Mixture Density Networks". The mixture is factored per latent dimension as in World Models:
each of the `z_dim` dimensions has its own K-component mixture. Optional heads predict the reward
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
    n_mixtures: int = 5  # Gaussians per latent dimension
    reward_head: bool = True  # predict the reward of each step
    done_head: bool = True  # predict whether each step ends the episode (Bernoulli logit)
    reward_weight: float = 1.0  # weight of the reward MSE in the loss
    done_weight: float = 1.0  # weight of the done BCE in the loss
    done_pos_weight: float = 1.0  # weight of positive (done) steps in the BCE: ends are rare
    min_log_sigma: float = -7.0  # clamp on component log-stds, for a finite NLL


@dataclass
class MDNOutput:
    logit_pi: torch.Tensor  # (B, T, z_dim, K) mixture logits
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
        self.mdn = nn.Linear(c.hidden, 3 * c.z_dim * c.n_mixtures)
        self.reward = nn.Linear(c.hidden, 1) if c.reward_head else None
        self.done = nn.Linear(c.hidden, 1) if c.done_head else None

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
        c = self.config
        x = torch.cat([z, action], dim=-1)  # (B, T, z_dim + action_dim)
        out, state = self.lstm(x, state)  # (B, T, hidden)
        B, T, _ = out.shape
        params = self.mdn(out).view(B, T, 3, c.z_dim, c.n_mixtures)  # (B, T, 3, z_dim, K)
        logit_pi, mu, log_sigma = params.unbind(dim=2)  # each (B, T, z_dim, K)
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
        """One step for a batch: z (B, z_dim), action (B, action_dim); outputs keep T = 1."""
        return self.forward(z.unsqueeze(1), action.unsqueeze(1), state)

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
    """
    x = x.unsqueeze(-1)  # (..., D, 1)
    log_norm = -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - LOG_SQRT_2PI  # (..., D, K)
    log_pi = F.log_softmax(logit_pi, dim=-1)  # (..., D, K)
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
    returns the mean of the most likely component. Shapes (..., D, K) -> (..., D).
    """
    if temperature <= 0:
        k = logit_pi.argmax(dim=-1, keepdim=True)  # (..., D, 1)
        return mu.gather(-1, k).squeeze(-1)
    probs = F.softmax(logit_pi / temperature, dim=-1)  # (..., D, K)
    flat = probs.reshape(-1, probs.shape[-1])  # (N, K)
    k = torch.multinomial(flat, 1, generator=generator).view(*probs.shape[:-1], 1)  # (..., D, 1)
    mean = mu.gather(-1, k).squeeze(-1)  # (..., D)
    sigma = log_sigma.gather(-1, k).squeeze(-1).exp() * math.sqrt(temperature)  # (..., D)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + sigma * noise
