"""Rollout scheduling on the trainer side: the queue-backed rollout, eval, filters and the buffer-fed rollout."""
