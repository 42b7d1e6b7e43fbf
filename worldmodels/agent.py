"""The World Models agent in the real env: V encodes the frame, C acts on [z, h], M updates h.

Per step (Ha & Schmidhuber 2018, Fig. 1): z_t = V(obs_t) (posterior mean), a_t = C([z_t, h_t]),
then M reads (z_t, a_t) through the same one-step protocol the dream runs (`gen_core/mdn.py`),
so h means the same thing to C in the real env as in the dream, whichever M it is.
`play_episode` runs one real episode and can record the frames and V's reconstructions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gen_core.errors import UserError
from gen_core.vae import VAE, images_to_float, images_to_uint8
from rollouts.recording import preprocess
from rollouts.store import open_store
from worldmodels.controller import BatchController, ControllerSpec, controller_obs
from worldmodels.models import check_controller_spec, load_controller, load_m, load_vae


@dataclass
class FrameSettings:
    """How the env's frames become V's input (as the collection stored them)."""

    size: int = 64
    crop_bottom: int = 0


@dataclass
class WorldModelAgent:
    """V + M + C acting in a real env; a callable `obs -> action` like any rollout policy.

    C is the linear controller of `params`, or `act`: any policy of what the dream env
    (`worldmodels/Dream-v0`) observes, the float32 vector [z, h] (z alone if `spec.hidden` is 0)
    -> action, e.g. an SB3 policy trained in the dream. Either way V and M run as for C."""

    vae: VAE
    m: torch.nn.Module  # M: anything with `stepper()` (the MDN-RNN, the Transformer M)
    spec: ControllerSpec
    frames: FrameSettings = field(default_factory=FrameSettings)
    params: np.ndarray | None = None
    act: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.stepper = self.m.stepper()
        self.controller = None
        if self.params is not None:
            self.set_params(self.params)
        self.reset()

    def set_params(self, params: np.ndarray) -> None:
        self.params = np.asarray(params, dtype=np.float32)
        self.controller = BatchController(self.params, self.spec)

    def reset(self, seed: int | None = None) -> None:
        self.state = self.stepper.initial_state(1)
        self.last_z = None

    def _encode(self, obs: np.ndarray) -> torch.Tensor:
        frame = preprocess(obs, self.frames.size, self.frames.crop_bottom)
        x = images_to_float(torch.from_numpy(np.array(frame[None])))  # PIL arrays are read-only
        return self.vae.encode(x)[0]  # (1, z_dim) posterior mean

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, override: Callable | None = None) -> np.ndarray:
        """C's action for this frame; `override(action) -> action` may change what is done
        (exploration noise), and M's state follows the action actually taken."""
        z = self._encode(obs)
        h = self.stepper.features(self.state)  # (1, features)
        x = controller_obs(z, h, self.spec)  # (1, in_dim): the dream env's observation
        if self.act is not None:
            action = torch.as_tensor(np.asarray(self.act(x[0].numpy()), np.float32))[None]
        else:
            action = self.controller(x[None])[0]  # (1, A)
        if override is not None:
            action = torch.as_tensor(override(action[0].numpy()), dtype=torch.float32)[None]
        self.state = self.stepper.observe(self.state, z, action)
        self.last_z = z
        return action[0].numpy().astype(np.float32)

    @torch.no_grad()
    def observe(self, obs: np.ndarray, action: np.ndarray) -> None:
        """Update M's state with a frame and an action this agent did not choose (a warm-up)."""
        z = self._encode(obs)
        a = torch.tensor(np.asarray(action, dtype=np.float32))[None]  # (1, A), a copy
        self.state = self.stepper.observe(self.state, z, a)
        self.last_z = z

    @torch.no_grad()
    def reconstruction(self) -> np.ndarray:
        """V's reconstruction of the last frame seen, (H, W, 3) uint8."""
        return images_to_uint8(self.vae.decode(self.last_z))[0].numpy()


def play_episode(env, policy, seed: int, max_steps: int, record: bool = False):
    """One real episode: (return, steps, frames, reconstructions); frames only if `record`."""
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset(seed)
    total, frames, recons = 0.0, [], []
    for t in range(max_steps):
        action = policy(obs)
        if record:
            frames.append(obs)
            if hasattr(policy, "reconstruction"):
                recons.append(policy.reconstruction())
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        if terminated or truncated:
            return total, t + 1, frames, recons
    return total, max_steps, frames, recons


def frame_settings(store_path: Path) -> FrameSettings:
    """How the store's frames were made from the env's (what V reads)."""
    info = open_store(store_path).info()
    return FrameSettings(size=info["frame_shape"][0], crop_bottom=info.get("crop_bottom", 0))


def check_frames(vae: VAE, store_path: Path, vae_path: Path) -> None:
    """UserError (one line, naming both) unless V reads frames of the store's shape."""
    info = open_store(store_path).info()
    frames = tuple(info["frame_shape"])
    size, channels = vae.config.image_size, vae.config.channels
    if frames != (size, size, channels):
        raise UserError(
            f"{vae_path}: V reads {size}x{size}x{channels} frames but the store {store_path} "
            f"holds {'x'.join(map(str, frames))}; use the store V was trained on (store=...) "
            "or a V trained on this store (vae=...)"
        )


def load_agent_parts(vae_path: Path, m_path: Path, store_path: Path, observe_hidden: bool = True):
    """(V, M, controller spec, frame settings) from the run's checkpoints and store."""
    vae, _ = load_vae(vae_path)
    check_frames(vae, store_path, vae_path)
    m, _ = load_m(m_path)
    if m.config.z_dim != vae.config.z_dim:
        raise UserError(
            f"{m_path}: M models z_dim {m.config.z_dim} but V encodes {vae.config.z_dim}; "
            "retrain M on latents of this VAE"
        )
    stepper = m.stepper()
    spec = ControllerSpec(
        z_dim=vae.config.z_dim,
        hidden=stepper.feature_dim if observe_hidden else 0,
        action_dim=stepper.action_dim,
    )
    return vae, m, spec, frame_settings(store_path)


def load_driver(controller: Path, vae: Path, m: Path, store: Path, which: str = "auto"):
    """A trained agent's parts and C's parameters: ((V, M, C's spec, frame settings), params),
    with C checked to fit V and M (it reads that M's memory)."""
    params, spec, _ = load_controller(controller, which)
    v, m_, agent_spec, frames = load_agent_parts(vae, m, store, observe_hidden=spec.hidden > 0)
    check_controller_spec(spec, agent_spec, controller)
    return (v, m_, spec, frames), params
