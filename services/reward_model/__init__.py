"""The reward-model service: slime's reward hub, remote and custom rewards, over HTTP and gRPC."""
