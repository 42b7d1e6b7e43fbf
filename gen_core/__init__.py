"""gen_core: the shared generative core of worldmodels.

Plain PyTorch modules with their losses and samplers (VAE, GAN, MDN-RNN, Transformer, diffusion),
plus the small pieces every training job needs (typed configs, atomic files, checkpoints, runs).
Nothing in here knows about games: `rollouts` and `worldmodels` build on it, never the reverse.
"""

from gen_core.errors import UserError

__all__ = ["UserError"]
