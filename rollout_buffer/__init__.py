"""The rollout-buffer service: a durable trajectory store in Redis, the agents' HTTP API and rollout workers."""
