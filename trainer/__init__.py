"""The trainer: the RL loop, algorithms, training backends, checkpoints and weight sync."""
