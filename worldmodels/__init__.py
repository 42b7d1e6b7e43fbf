"""worldmodels: the World Models pipeline (Ha & Schmidhuber, 2018) on top of gen_core.

random rollouts -> V (VAE) -> M (MDN-RNN predicting next latent, reward, episode end)
-> C (controller evolved with CMA-ES in the real env or inside M's dream) -> real-env score.
"""
