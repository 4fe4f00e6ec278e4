"""Training: one shared loop (`trainers.loop`) and one module per method (`trainers.clean`, ...)."""

from trainers.loop import Method, StepContext, TrainingError, evaluate, fit

__all__ = ["Method", "StepContext", "TrainingError", "evaluate", "fit"]
