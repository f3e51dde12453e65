"""Training: ranker fine-tuning (the SLIP paper's recipe) and, in ``slip.train.sam``, SAM fine-tuning."""

from slip.train.ranker import TrainConfig, TrainResult, train_ranker

__all__ = ["TrainConfig", "TrainResult", "train_ranker"]
