"""gen_core: the shared generative core of worldmodels.

Plain PyTorch modules with their losses and samplers (VAE, GAN, MDN-RNN, Transformer, diffusion),
plus the small pieces every training job needs (typed configs, atomic files, checkpoints, runs).
Nothing in here knows about games: `rollouts` and `worldmodels` build on it, never the reverse.
"""

import os

# Idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with Ray workers or a
# data-loading thread, spinning threads made torch ~10x slower. OpenMP reads this when torch is
# first imported, which in this toolkit comes after gen_core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gen_core.errors import UserError  # noqa: E402

__all__ = ["UserError"]
