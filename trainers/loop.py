"""The one training loop every method shares.

A method only says how to turn a batch into a loss (`training_step`) and may
hook in around it: `after_backward` sees the gradients before the optimizer
step (BANG rescales them there; the perturbation bias takes its FGSM step
there), `on_epoch_start` is where a sampler redraws. Everything else - device
placement, optimizer and schedule from OptimConfig, progress bars, metrics,
evaluation - lives here once.

Every loader yields `advpipe.batch.Batch` (x, y, variant, index, optional
x_clean); the loop moves the whole batch to the device and hands it on, and
only methods look beyond x and y.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from advpipe.batch import Batch
from advpipe.config import OptimConfig
from advpipe.devices import resolve_device
from advpipe.errors import AdvpipeError

log = logging.getLogger(__name__)

POSTFIX_EVERY = 10  # steps between progress-bar loss updates


class TrainingError(AdvpipeError):
    """Training cannot go on (diverged, nothing to train on)."""


@dataclass
class StepContext:
    """Where the loop is, handed to every method hook."""

    epoch: int  # 0-based
    epochs: int
    batch_index: int  # within the epoch
    global_step: int
    device: torch.device
    optimizer: torch.optim.Optimizer


class Method(ABC):
    """How one training method turns batches into losses.

    Subclasses implement `training_step`; every other hook defaults to doing nothing.
    """

    name = "method"

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Once before training (register hooks, move auxiliary networks to `device`)."""

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """What the optimizer updates; methods with their own trained modules add theirs."""
        return [p for p in model.parameters() if p.requires_grad]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Before an epoch's first batch (e.g. redraw sampling probabilities)."""

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        """The loss to backpropagate and per-batch metrics (means; "acc" becomes train_acc)."""

    def after_backward(self, model: nn.Module, batch: Batch, ctx: StepContext) -> None:
        """Gradients are populated and the optimizer has not stepped yet."""

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """After evaluation; may add entries to the epoch's history `record`."""

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        """Logits used for evaluation (a method may wrap the model, e.g. the calibrater)."""
        return model(x)

    def teardown(self, model: nn.Module) -> None:
        """Once after training, also after an error (remove hooks)."""


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def build_optimizer(params: Iterable[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise TrainingError("nothing to train: the method gave the optimizer no parameters")
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)
    return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine from lr to 0 over `total_steps` scheduler steps, or constant."""
    if optim.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def fit(model: nn.Module, method: Method, train_loader: Iterable[Batch], *, optim: OptimConfig,
        device: torch.device | str = "cpu", eval_loader: Iterable[Batch] | None = None,
        progress: bool = True) -> list[dict[str, Any]]:
    """Train `model` with `method` for optim.epochs; return one history record per epoch.

    The schedule steps per batch when the loader has a length, else per epoch
    (iterable stores). Seeding is the caller's job.
    """
    device = resolve_device(device)
    model.to(device)
    method.setup(model, device)
    try:
        optimizer = build_optimizer(method.parameters(model), optim)
        steps_per_epoch = _length(train_loader)
        per_batch = steps_per_epoch is not None
        scheduler = build_scheduler(optimizer, optim,
                                    optim.epochs * steps_per_epoch if per_batch else optim.epochs)
        history: list[dict[str, Any]] = []
        global_step = 0
        for epoch in range(optim.epochs):
            start = time.perf_counter()
            model.train()
            method.on_epoch_start(model, epoch)
            sums: dict[str, float] = defaultdict(float)
            seen = 0
            bar = tqdm(train_loader, total=steps_per_epoch, disable=not progress, leave=False,
                       desc=f"{method.name} epoch {epoch + 1}/{optim.epochs}", dynamic_ncols=True)
            for batch_index, raw in enumerate(bar):
                batch = raw.to(device, non_blocking=True)
                ctx = StepContext(epoch, optim.epochs, batch_index, global_step, device, optimizer)
                optimizer.zero_grad(set_to_none=True)
                loss, metrics = method.training_step(model, batch, ctx)
                if not torch.isfinite(loss):
                    raise TrainingError(f"{method.name}: loss is {loss.item()} at epoch {epoch + 1}, "
                                        f"batch {batch_index}; lower the learning rate (now {optim.lr})")
                loss.backward()
                method.after_backward(model, batch, ctx)
                optimizer.step()
                if per_batch:
                    scheduler.step()
                global_step += 1
                count = len(batch)
                seen += count
                sums["loss"] += loss.item() * count
                for key, value in metrics.items():
                    sums[f"train_{key}"] += float(value) * count
                if batch_index % POSTFIX_EVERY == 0:
                    bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}")
            if not per_batch:
                scheduler.step()
            if seen == 0:
                raise TrainingError(f"{method.name}: the training loader yielded no batches")
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            record.update({key: value / seen for key, value in sums.items()})
            record["eval_acc"] = (None if eval_loader is None else evaluate(
                model, eval_loader, device, predict=lambda x: method.predict(model, x)))
            record["time_s"] = time.perf_counter() - start
            method.on_epoch_end(model, epoch, record)
            history.append(record)
            log.info("%s epoch %d/%d: loss %.4f, train acc %s, eval acc %s (%.1fs)", method.name,
                     epoch + 1, optim.epochs, record["loss"], _pct(record.get("train_acc")),
                     _pct(record["eval_acc"]), record["time_s"])
    finally:
        method.teardown(model)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], device: torch.device | str = "cpu",
             predict: Callable[[Tensor], Tensor] | None = None) -> float:
    """Top-1 accuracy of `predict(x)` (default `model(x)`) over a loader's batches, in eval mode."""
    device = resolve_device(device)
    predict = model if predict is None else predict
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for raw in loader:
            batch = raw.to(device, non_blocking=True)
            correct += int((predict(batch.x).argmax(dim=1) == batch.y).sum())
            total += len(batch)
    finally:
        model.train(was_training)
    if total == 0:
        raise TrainingError("cannot evaluate: the evaluation loader yielded no batches")
    return correct / total


def _length(loader: Iterable[Batch]) -> int | None:
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    return length or None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
