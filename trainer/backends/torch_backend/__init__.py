"""The torch training backend (``--train-backend fsdp``): Hugging Face models sharded with FSDP2."""

from trainer.backends.torch_backend.trainer import TorchTrainer, TrainResult, WeightSyncReport

__all__ = ["TorchTrainer", "TrainResult", "WeightSyncReport"]
