"""The rollout-engine service: the built-in torch engine or a supervised SGLang server behind one SGLang-compatible API."""
