"""The shared service core, the rollout-engine and reward-model services, and the `slime` command line."""
