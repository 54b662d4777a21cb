"""Training: data in, a trained adapter out.

    data.py     JSONL files -> checked examples -> token ids with the prompt masked -> padded batches
    config.py   TrainConfig: every setting, validated, with the help text `tinylora train --help` shows
    step.py     train_step (micro-batches, accumulate, clip, AdamW) and evaluate
    trainer.py  the loop around train_step: reports, evaluation, checkpoints, exact resume, early stop
    report.py   the progress bar, report lines, the JSONL log, the loss-curve picture
"""

from .config import TrainConfig
from .step import evaluate, train_step
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train", "train_step"]
