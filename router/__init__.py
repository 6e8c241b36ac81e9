"""The router service: worker registry, load balancing, engine health, retries and middlewares."""
