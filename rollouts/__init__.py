"""rollouts: episodes from gymnasium pixel envs (CarRacing first), policies, parallel collection
with Ray, and a compact on-disk episode store. Never imports `worldmodels`."""
