"""Clean training: plain cross-entropy, and training the white-box source model.

The source model is what every attack in the store runs against, so its
checkpoint records the exact data it saw (dataset fingerprints), its accuracy
and the settings, and training is reproducible from config.seed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from advpipe.config import Config
from advpipe.datasets import Source, load_source
from advpipe.devices import resolve_device
from advpipe.errors import ModelError
from advpipe.io import check_writable
from advpipe.models import build_model, save_checkpoint
from advpipe.sampler.mapstyle import StoreLoader
from advpipe.sampler.source import source_loader
from advpipe.trainers.baselines import CleanMethod
from advpipe.trainers.loop import fit

log = logging.getLogger(__name__)

EVAL_BATCH = 512


def split_loader(split: Source, batch_size: int, *, shuffle: bool, seed: int = 0,
                 num_workers: int = 0) -> StoreLoader:
    """Clean Batches of a source split (x float [0, 1] NCHW, y, index; variant 0); shuffled per epoch by seed."""
    return source_loader(split, batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers)


def train_source(config: Config, device: torch.device | str | None = None,
                 progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train config.model.arch on config.source with config.train_source; write the checkpoint.

    Returns the checkpoint path and metrics (test_acc, train_acc, epochs, seconds, history).
    """
    device = resolve_device(config.device if device is None else device)
    _check_writable(Path(config.model.checkpoint))
    optim = config.train_source
    torch.manual_seed(config.seed)
    train = load_source(config.source, "train")
    test = load_source(config.source, "test")
    height, width, channels = train.image_shape
    model = build_model(config.model.arch, train.num_classes, (channels, height, width),
                        weights=config.model.weights)
    log.info("training source model %s on %s (%d train / %d test images) on %s", model.arch,
             config.source.kind, len(train), len(test), device)
    start = time.perf_counter()
    history = fit(
        model, CleanMethod(),
        split_loader(train, optim.batch_size, shuffle=True, seed=config.seed,
                     num_workers=optim.num_workers),
        optim=optim, device=device, progress=progress,
        eval_loader=split_loader(test, max(optim.batch_size, EVAL_BATCH), shuffle=False,
                                 num_workers=optim.num_workers),
    )
    last = history[-1]
    metrics: dict[str, Any] = {
        "test_acc": last["eval_acc"], "train_acc": last.get("train_acc"), "epochs": optim.epochs,
        "seconds": time.perf_counter() - start, "history": history,
    }
    training = {
        "method": CleanMethod.name,
        "dataset": {"train": train.fingerprint, "test": test.fingerprint},
        "source": config.source.model_dump(mode="json"),
        "optim": optim.model_dump(mode="json"),
        "seed": config.seed,
        "test_accuracy": metrics["test_acc"],
        "train_accuracy": metrics["train_acc"],
        "epochs": optim.epochs,
        "seconds": round(metrics["seconds"], 3),
    }
    path = Path(config.model.checkpoint)
    meta = save_checkpoint(path, model, train.class_names, training)
    log.info("source model %s: test accuracy %.2f%% after %d epochs (%.1fs); saved to %s (%s)",
             meta.arch, 100 * metrics["test_acc"], optim.epochs, metrics["seconds"], path,
             meta.fingerprint[:12])
    return path, metrics


def _check_writable(path: Path) -> None:
    """Fail before training, not after it, when the checkpoint cannot be written."""
    if path.is_dir():
        raise ModelError(f"{path}: cannot write the checkpoint here (is a directory); choose a writable "
                         "model.checkpoint")
    check_writable(path.parent, ModelError, "the checkpoint", "choose a writable model.checkpoint", subject=path)


def source_model_is_current(config: Config) -> bool:
    """True when config.model.checkpoint was trained by `train_source` on exactly this config's data and settings.

    `advpipe run` uses it to skip retraining; any doubt (missing, unreadable, other data) means retrain.
    """
    from advpipe.errors import AdvpipeError
    from advpipe.models.checkpoint import load_checkpoint

    path = Path(config.model.checkpoint)
    if not path.is_file():
        return False
    try:
        _, meta = load_checkpoint(path, arch=config.model.arch)
    except AdvpipeError:
        return False
    training = meta.training
    expected = {
        "dataset": {split: load_source(config.source, split).fingerprint for split in ("train", "test")},
        "optim": config.train_source.model_dump(mode="json"),
        "seed": config.seed,
    }
    return all(training.get(key) == value for key, value in expected.items())
