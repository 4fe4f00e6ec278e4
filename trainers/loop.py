"""The one training loop every method shares.

A method only says how to turn a batch into a loss (`training_step`) and may
hook in around it: `after_backward` sees the gradients before the optimizer
step (BANG rescales them there; the perturbation bias takes its FGSM step
there), `on_epoch_end` may feed per-variant errors back to the sampler. Everything else
lives here once: device placement and mixed precision, optimizer and schedule,
data-parallel gradient averaging (`trainers.distributed`), augmentation, metrics,
evaluation, and checkpoints that resume bit for bit (`trainers.state`).

Every loader yields `advpipe.batch.Batch`; the loop moves it to the device and hands
it on. A method reaches the loader as `method.loader` (the store loaders'
`update()` and `metrics()` live there).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn
from tqdm.auto import tqdm

from advpipe.batch import Batch
from advpipe.config import OptimConfig, SamplerConfig
from advpipe.devices import resolve_device
from advpipe.errors import ConfigError, TrainingError, describe_validation_error
from advpipe.faults import fault_point
from advpipe.trainers import distributed
from advpipe.trainers.augment import scenario_a
from advpipe.trainers.metrics import EpochSums
from advpipe.trainers.state import RunState, load_run_state, save_run_state

log = logging.getLogger(__name__)

POSTFIX_EVERY = 10  # steps between progress-bar loss updates
DataRegime = Literal["clean", "adversarial", "both", "sampler"]


@dataclass
class StepContext:
    """Where the loop is, handed to every per-step method hook."""

    epoch: int  # 0-based
    epochs: int
    batch_index: int  # within the epoch
    global_step: int
    device: torch.device
    optimizer: torch.optim.Optimizer


class NoParams(BaseModel):
    """For methods without parameters of their own: any key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(ABC):
    """How one training method turns batches into losses.

    Subclasses implement `training_step`; every other hook defaults to doing nothing. A method
    with networks or optimisers of its own lists them in `modules()` / `optimizers()`, so that
    checkpoints hold them and resumption restores them.
    """

    name = "method"
    params_model: ClassVar[type[BaseModel]] = NoParams  # the method's typed parameters (config: methods.NAME)
    default_data: ClassVar[DataRegime] = "clean"  # which images it trains on unless the config says `data:`
    loader: Any = None  # the training loader, set by the loop before setup()

    def __init__(self, params: BaseModel | dict[str, Any] | None = None, **values: Any) -> None:
        if params is not None and values:
            raise ConfigError(f"give method '{self.name}' its parameters or keyword values, not both")
        self.params = method_params(self.name, self.params_model, params if params is not None else values)

    @classmethod
    def build(cls, params: BaseModel, context: Any) -> Method:
        """The method for validated `params`; `context` (trainers.registry.MethodContext) describes the
        store and the source model, for methods that need them."""
        return cls(params)

    def sampler_config(self, data: DataRegime, base: SamplerConfig, attacks: list[str]) -> SamplerConfig:
        """The sampler policy of a data regime: clean only, adversarial only, both (half and half) or the
        config's `sampler` section. `attacks` are the store's attack variants (shifts left out)."""
        return regime_sampler(data, base, attacks)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Once before training (register hooks, move auxiliary networks to `device`)."""

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """What the loop's optimizer updates; methods with their own trained modules add theirs."""
        return [p for p in model.parameters() if p.requires_grad]

    def modules(self) -> dict[str, nn.Module]:
        """The method's own networks (a detector head, a calibrater), saved in checkpoints."""
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers the method steps itself (beside the loop's), saved in checkpoints."""
        return {}

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Before an epoch's first batch."""

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        """The loss to backpropagate and per-batch metrics.

        Metrics are batch means ("acc" becomes train_acc), except `correct`: a bool tensor per
        sample, from which the loop computes the per-variant training accuracy.
        """

    def after_backward(self, model: nn.Module, batch: Batch, ctx: StepContext) -> None:
        """Gradients are populated (and averaged over ranks) and the optimizer has not stepped yet."""

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        """After evaluation; may add entries to the epoch's history `record` (the same on every rank)."""

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        """Logits used for evaluation (a method may wrap the model, e.g. the calibrater)."""
        return model(x)

    def teardown(self, model: nn.Module) -> None:
        """Once after training, also after an error (remove hooks)."""

    def save_artifacts(self, run_dir: Path) -> None:
        """Write the method's own products beside the run's model file (e.g. the calibrater network)."""

    def export(self, model: nn.Module) -> nn.Module:
        """The model as it is saved for use: an ordinary model of its registry architecture (a method
        that changed its layers, such as the perturbation bias, returns a folded copy)."""
        return model


def method_params(method: str, model: type[BaseModel], raw: BaseModel | dict[str, Any] | None) -> Any:
    """A method's typed parameters; a problem is a ConfigError naming the method and the key."""
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as exc:
        raise ConfigError("; ".join(describe_validation_error(exc, f"method '{method}': ", noun="parameter"))) from None


def regime_sampler(data: DataRegime, base: SamplerConfig, attacks: list[str]) -> SamplerConfig:
    if data == "sampler":
        return base
    if data != "clean" and not attacks:
        raise TrainingError(f"data '{data}' needs adversarial variants, but the store holds none; add attacks "
                            "to the config's variants and regenerate the store")
    ratio = {"clean": 0.0, "adversarial": 1.0, "both": 0.5}[data]
    weights = {name: 1.0 for name in attacks} if ratio else {}
    return SamplerConfig.model_validate({**base.model_dump(), "ratio": ratio, "weights": weights, "groups": {},
                                         "adaptive": False, "redraw": "batch"})


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


@dataclass
class Checkpointing:
    """Where and how often the loop saves its full state; `resume` continues from the file if it exists."""

    path: Path
    every_steps: int = 0  # also every N optimizer steps (0: at epoch ends only)
    resume: bool = False
    on_save: Callable[[RunState], None] | None = None  # e.g. write the run's model file beside it


def fit(model: nn.Module, method: Method, train_loader: Iterable[Batch], *, optim: OptimConfig,
        device: torch.device | str = "cpu", eval_loader: Iterable[Batch] | None = None, progress: bool = True,
        amp: bool = False, augment: bool = False, seed: int = 0, checkpoint: Checkpointing | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train `model` with `method` for optim.epochs; return one history record per epoch.

    amp: bf16 autocast for the method's forward passes. augment: scenario A (random resized crop and
    horizontal flip), seeded by (seed, step). Under torch.distributed every rank calls fit with its
    own part of the data; gradients are averaged after `after_backward`, so every rank takes the same
    step, and only rank 0 writes checkpoints and calls `on_epoch`. The schedule steps per batch when
    the loader has a length, else per epoch.
    """
    device = resolve_device(device)
    model.to(device)
    method.loader = train_loader
    method.setup(model, device)
    try:
        optimizer = build_optimizer(method.parameters(model), optim)
        steps_per_epoch = _length(train_loader)
        per_batch = steps_per_epoch is not None
        scheduler = build_scheduler(optimizer, optim,
                                    optim.epochs * steps_per_epoch if per_batch else optim.epochs)
        state = RunState(model=model, method=method, optimizer=optimizer, scheduler=scheduler, loader=train_loader)
        if checkpoint is not None and checkpoint.resume and checkpoint.path.is_file():
            load_run_state(checkpoint.path, state, device)
            log.info("%s: resumed from %s at epoch %d, step %d", method.name, checkpoint.path, state.epoch + 1,
                     state.step_in_epoch)
        distributed.broadcast_module(model)
        trained = [model, *method.modules().values()]
        while state.epoch < optim.epochs:
            _run_epoch(state, optim, device, amp, augment, seed, checkpoint, progress, trained, per_batch)
            record = _finish_epoch(state, eval_loader, device, per_batch, scheduler)
            method.on_epoch_end(model, state.epoch, record)
            state.history.append(record)
            state.epoch, state.step_in_epoch, state.sums = state.epoch + 1, 0, EpochSums()
            log.info("%s epoch %d/%d: loss %.4f, train acc %s, eval acc %s (%.1fs, %.0f images/s)", method.name,
                     record["epoch"], optim.epochs, record["loss"], _pct(record.get("train_acc")),
                     _pct(record["eval_acc"]), record["time_s"], record["images_per_s"])
            if distributed.is_main():
                if on_epoch is not None:  # before the checkpoint: a resumed run rewrites records after it
                    on_epoch(record)
                if checkpoint is not None:
                    save_run_state(checkpoint.path, state)
                    if checkpoint.on_save is not None:
                        checkpoint.on_save(state)
                    fault_point(f"epoch-{state.epoch}-saved")
    finally:
        method.teardown(model)
    return state.history


def _run_epoch(state: RunState, optim: OptimConfig, device: torch.device, amp: bool, augment: bool, seed: int,
               checkpoint: Checkpointing | None, progress: bool, trained: list[nn.Module], per_batch: bool) -> None:
    model, method, optimizer = state.model, state.method, state.optimizer
    if state.step_in_epoch == 0:
        state.elapsed = state.data_wait = 0.0
    start = time.perf_counter()
    model.train()
    method.on_epoch_start(model, state.epoch)
    total = _length(state.loader)
    bar = tqdm(state.loader, total=total, initial=state.step_in_epoch, disable=not progress, leave=False,
               desc=f"{method.name} epoch {state.epoch + 1}/{optim.epochs}", dynamic_ncols=True)
    batches = iter(bar)
    while True:
        asked = time.perf_counter()
        raw = next(batches, None)
        state.data_wait += time.perf_counter() - asked  # time the step waits for the loader
        if raw is None:
            break
        batch = raw.to(device, non_blocking=True).decode()  # a stored-form batch is decoded on the device
        if augment:
            batch = scenario_a(batch, seed, state.global_step)
        ctx = StepContext(state.epoch, optim.epochs, state.step_in_epoch, state.global_step, device, optimizer)
        distributed.broadcast_buffers(model)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            loss, metrics = method.training_step(model, batch, ctx)
        if not torch.isfinite(loss):
            raise TrainingError(f"{method.name}: loss is {loss.item()} at epoch {state.epoch + 1}, batch "
                                f"{state.step_in_epoch}; lower the learning rate (now {optim.lr})")
        loss.backward()
        distributed.average_gradients(trained)
        method.after_backward(model, batch, ctx)
        optimizer.step()
        if per_batch:
            state.scheduler.step()
        state.global_step += 1
        state.step_in_epoch += 1
        state.sums.add(len(batch), loss.item(), metrics, batch.variant)
        if state.step_in_epoch % POSTFIX_EVERY == 1:
            bar.set_postfix(loss=f"{state.sums.values['loss'] / state.sums.seen:.4f}")
        if (checkpoint is not None and checkpoint.every_steps and state.global_step % checkpoint.every_steps == 0
                and state.step_in_epoch < (total or 0) and distributed.is_main()):
            state.elapsed += time.perf_counter() - start
            start = time.perf_counter()
            save_run_state(checkpoint.path, state)
            fault_point(f"step-{state.global_step}-saved")
    state.elapsed += time.perf_counter() - start


def _finish_epoch(state: RunState, eval_loader: Iterable[Batch] | None, device: torch.device, per_batch: bool,
                  scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    if not per_batch:
        scheduler.step()
    sums = state.sums.reduced()
    if sums.seen == 0:
        raise TrainingError(f"{state.method.name}: the training loader yielded no batches")
    names = list(getattr(state.loader, "variant_names", ["clean"]))
    record: dict[str, Any] = {"epoch": state.epoch + 1, "lr": state.optimizer.param_groups[0]["lr"]}
    record.update(sums.record(names))
    if hasattr(state.loader, "metrics"):
        record.update(state.loader.metrics())
    record["eval_acc"] = None
    if eval_loader is not None and distributed.is_main():
        record["eval_acc"] = evaluate(state.model, eval_loader, device,
                                      predict=lambda x: state.method.predict(state.model, x))
    record["time_s"] = state.elapsed
    record["images_per_s"] = sums.seen / state.elapsed if state.elapsed > 0 else 0.0
    record["data_wait_s"] = state.data_wait
    record["loader_share"] = state.data_wait / state.elapsed if state.elapsed > 0 else 0.0
    return record


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
            batch = raw.to(device, non_blocking=True).decode()
            correct += int((predict(batch.x).argmax(dim=1) == batch.y).sum())
            total += len(batch)
    finally:
        model.train(was_training)
    if total == 0:
        raise TrainingError("cannot evaluate: the evaluation loader yielded no batches")
    return correct / total


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (CUDA, or CPU when asked, as the tests do); a no-op without amp."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _length(loader: Iterable[Batch]) -> int | None:
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    return length or None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
