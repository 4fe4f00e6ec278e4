"""A training run's full state in one atomic file, so `--resume` continues bit for bit.

The file holds the model, the optimizer and scheduler, the method's own networks and
optimisers, the loader's position (epoch, batches consumed, adaptive policy), every RNG
state, the history so far and the running sums of a half-done epoch. It is written with
`torch.save` of plain types and tensors only and read with `weights_only=True`, so
loading a checkpoint can never run code; JSON-shaped parts are stored as JSON strings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advpipe.errors import SHOWN_CHARS, TrainingError, shorten
from advpipe.io import atomic_path
from advpipe.trainers.metrics import EpochSums

STATE_FORMAT = "advpipe-run-state/1"


@dataclass
class RunState:
    model: nn.Module
    method: Any  # trainers.loop.Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch done
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: EpochSums = field(default_factory=EpochSums)
    elapsed: float = 0.0  # seconds spent in the current epoch so far
    data_wait: float = 0.0  # of which waiting for the loader's next batch


def save_run_state(path: Path, state: RunState) -> None:
    """Write the run's state atomically (a reader sees the previous checkpoint or this one, never half)."""
    loader_state = state.loader.state_dict() if hasattr(state.loader, "state_dict") else None
    if state.step_in_epoch and loader_state is None:
        raise TrainingError("a checkpoint in the middle of an epoch needs a loader with state_dict() "
                            "(the store and source loaders of advpipe.sampler have one)")
    payload = {
        "format": STATE_FORMAT,
        "position": json.dumps({"epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                                "global_step": state.global_step, "elapsed": state.elapsed,
                                "data_wait": state.data_wait}),
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": json.dumps(state.scheduler.state_dict()),
        "method_modules": {name: module.state_dict() for name, module in state.method.modules().items()},
        "method_optimizers": {name: opt.state_dict() for name, opt in state.method.optimizers().items()},
        "loader": json.dumps(loader_state),
        "rng": _rng_states(),
        "history": json.dumps(state.history),
        "sums": json.dumps(state.sums.to_state()),
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as exc:
        raise TrainingError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); free space or "
                            "choose another run directory") from None


def load_run_state(path: Path, state: RunState, device: torch.device) -> None:
    """Restore everything `save_run_state` wrote into the live objects of `state`."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a damaged file fails inside torch's unpickler in many ways
        raise TrainingError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: "
                            f"{shorten((str(exc).splitlines() or [''])[0], 2 * SHOWN_CHARS)}); "
                            "start again without --resume, or restore the file") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not an advpipe training checkpoint ({STATE_FORMAT})")
    try:
        _restore(payload, state, path)
    except TrainingError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        # a damaged or edited file: a missing part, JSON nested past the stack (RecursionError is a
        # RuntimeError), tensors of another shape
        problem = "nested too deeply" if isinstance(exc, RecursionError) else shorten(
            (str(exc).splitlines() or [type(exc).__name__])[0], 2 * SHOWN_CHARS)
        raise TrainingError(f"{path}: training checkpoint is damaged or does not fit this run ({type(exc).__name__}: "
                            f"{problem}); start again without --resume, or restore the file") from None


def _restore(payload: dict[str, Any], state: RunState, path: Path) -> None:
    position = json.loads(payload["position"])
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(json.loads(payload["scheduler"]))
    modules, optimizers = state.method.modules(), state.method.optimizers()
    if set(modules) != set(payload["method_modules"]) or set(optimizers) != set(payload["method_optimizers"]):
        raise TrainingError(f"{path}: checkpoint was written by another method's setup "
                            f"(modules {sorted(payload['method_modules'])}, this method has {sorted(modules)})")
    for name, module in modules.items():
        module.load_state_dict(payload["method_modules"][name])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["method_optimizers"][name])
    loader_state = json.loads(payload["loader"])
    if loader_state is not None and hasattr(state.loader, "load_state_dict"):
        state.loader.load_state_dict(loader_state)
    _set_rng_states(payload["rng"])
    state.epoch, state.step_in_epoch = position["epoch"], position["step_in_epoch"]
    state.global_step, state.elapsed = position["global_step"], position["elapsed"]
    state.data_wait = position.get("data_wait", 0.0)
    state.history = json.loads(payload["history"])
    state.sums = EpochSums.from_state(json.loads(payload["sums"]))


def _rng_states() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": json.dumps(_jsonable(np.random.get_state())),
        "python": json.dumps(_jsonable(random.getstate())),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    kind, keys, pos, has_gauss, gauss = json.loads(states["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(states["python"])
    random.setstate((version, tuple(internal), gauss_next))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value
