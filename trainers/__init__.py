"""Training: one shared loop (`advpipe.trainers.loop`) and one module per method (`advpipe.trainers.clean`, ...)."""

from advpipe.errors import TrainingError
from advpipe.trainers.loop import Checkpointing, Method, StepContext, evaluate, fit

__all__ = ["Checkpointing", "Method", "StepContext", "TrainingError", "evaluate", "fit"]
