"""Training: one shared loop (`advpipe.trainers.loop`) and one module per method (`advpipe.trainers.clean`, ...)."""

from advpipe.trainers.loop import Method, StepContext, TrainingError, evaluate, fit

__all__ = ["Method", "StepContext", "TrainingError", "evaluate", "fit"]
