"""C: the controller of World Models, a single linear layer from [z, h] to the action.

Ha & Schmidhuber (2018) kept C tiny (867 parameters for CarRacing: (32 + 256) x 3 + 3) so that
almost all of the agent's complexity lives in V and M, and C can be evolved with CMA-ES.
Actions are squashed as World Models did for CarRacing: steering tanh in [-1, 1], gas
(tanh + 1) / 2 in [0, 1], brake tanh clipped to [0, 1].

Parameters travel as one flat vector (what CMA-ES searches over). `BatchController` evaluates a
whole population at once: one batched matmul for every candidate x trial, so a dream rollout of
the full population is a handful of tensor ops per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ControllerSpec:
    """Shape of a linear controller."""

    z_dim: int = 32  # latent size from V
    hidden: int = 256  # M's hidden size (0: the z-only variant)
    action_dim: int = 3  # actions produced
    squash: str = "carracing"  # carracing: steer tanh, gas (tanh+1)/2, brake clip(tanh, 0, 1); tanh

    @property
    def in_dim(self) -> int:
        return self.z_dim + self.hidden

    @property
    def n_params(self) -> int:
        return self.in_dim * self.action_dim + self.action_dim


def squash_actions(raw: torch.Tensor, mode: str) -> torch.Tensor:
    """Map unbounded outputs (..., A) to the env's action ranges."""
    a = torch.tanh(raw)
    if mode == "carracing":
        steer = a[..., 0:1]
        gas = (a[..., 1:2] + 1.0) / 2.0
        brake = a[..., 2:3].clamp(min=0.0, max=1.0)
        return torch.cat([steer, gas, brake], dim=-1)
    if mode == "tanh":
        return a
    raise ValueError(f"unknown squash {mode!r}")


def split_params(flat: torch.Tensor, spec: ControllerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat params (..., n_params) -> weight (..., in_dim, A) and bias (..., A)."""
    n_w = spec.in_dim * spec.action_dim
    w = flat[..., :n_w].reshape(*flat.shape[:-1], spec.in_dim, spec.action_dim)
    b = flat[..., n_w : n_w + spec.action_dim]
    return w, b


class BatchController:
    """A population of linear controllers applied in one batched matmul.

    `params` (P, n_params); observations (P, N, in_dim) for N rollouts per candidate.
    """

    def __init__(self, params: torch.Tensor | np.ndarray, spec: ControllerSpec):
        params = torch.as_tensor(np.asarray(params), dtype=torch.float32)
        if params.ndim == 1:
            params = params.unsqueeze(0)
        if params.shape[-1] != spec.n_params:
            raise ValueError(f"expected {spec.n_params} parameters, got {params.shape[-1]}")
        self.spec = spec
        self.w, self.b = split_params(params, spec)  # (P, in, A), (P, A)

    def to(self, device) -> BatchController:
        self.w, self.b = self.w.to(device), self.b.to(device)
        return self

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (P, N, in_dim) -> actions (P, N, A)."""
        raw = torch.baddbmm(self.b.unsqueeze(1), obs, self.w)  # (P, N, A)
        return squash_actions(raw, self.spec.squash)


def controller_obs(z: torch.Tensor, h: torch.Tensor | None, spec: ControllerSpec) -> torch.Tensor:
    """What C sees: [z, h] (or z alone for the z-only variant)."""
    if spec.hidden == 0 or h is None:
        return z
    return torch.cat([z, h], dim=-1)
