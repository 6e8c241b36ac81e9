"""The quick-start task and model: verifiable arithmetic, a tiny Qwen-architecture model and its SFT warm start."""
