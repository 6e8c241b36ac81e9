"""The rollout-engine service: the built-in torch engine or a supervised SGLang server behind SGLang's HTTP API."""
