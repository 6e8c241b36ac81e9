"""The Megatron training backend (``--train-backend megatron``): megatron-core's GPTModel built from a Hugging Face
config, tensor and data parallelism, Megatron's DDP, optimizer and distributed checkpoints; and the Hugging Face ⇄
Megatron weight conversion, which needs only torch. ``trainer.MegatronTrainer`` is what the driver uses."""
