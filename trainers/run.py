"""`advpipe train CONFIG --method NAME`: one method trained from the store into a run directory.

A run directory holds everything needed to trace a model back to its data and to continue it:

    run.json          the resolved settings, the store's and source model's fingerprints, the status
    checkpoint.pt     the full training state (trainers.state), rewritten atomically every epoch
    model.pt          the trained model as an ordinary advpipe checkpoint (advpipe.models)
    metrics.jsonl     one JSON record per epoch (and tensorboard/ when the extra is installed)

Re-running a finished run with the same settings does nothing; `--resume` continues an
interrupted one; a directory made with other settings is never overwritten.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advpipe.config import Config, MethodConfig, SamplerConfig
from advpipe.devices import resolve_device
from advpipe.errors import ConfigError, TrainingError
from advpipe.io import atomic_write_json, sha256_json
from advpipe.models import build_model, save_checkpoint
from advpipe.models.checkpoint import load_checkpoint
from advpipe.provenance import library_versions
from advpipe.sampler import open_loader
from advpipe.stores import Store, open_store
from advpipe.trainers import distributed
from advpipe.trainers.loop import Checkpointing, fit
from advpipe.trainers.metrics import MetricsWriter, read_metrics
from advpipe.trainers.registry import MethodContext, build_method, method_name, validate_method
from advpipe.urls import config_storage_options

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
CLEAN_ONLY = SamplerConfig(ratio=(0.0, 0.0))


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "trained", "resumed", "up-to-date"
    history: list[dict[str, Any]]
    model_path: Path


def method_entry(config: Config, name: str) -> MethodConfig:
    """The config's entry for `name`, or the method's defaults when the config does not list it."""
    if name in config.methods:
        return config.methods[name]
    entry = MethodConfig()
    validate_method(name, entry)  # an unknown name is a ConfigError listing the methods
    return entry


def train(config: Config, name: str, *, out: str | Path | None = None, resume: bool = False,
          device: str | None = None, progress: bool = True, replace: bool = False) -> RunResult:
    """Train method `name` (an entry of config.methods, or a registered method) on config.store.

    replace: a run directory made with other settings is cleared and trained again (the main job
    does this in its own runs directory); otherwise it is refused and left untouched.
    """
    entry = method_entry(config, name)
    device_ = distributed.init_from_environment(resolve_device(device or config.device))
    store = open_store(config.store.path, storage_options=config_storage_options(config.store.path, config.store))
    context = _context(config, store, entry)
    run_dir = Path(out) if out is not None else config.train.runs_dir / config.name / name
    settings = _settings(config, name, entry, store, context)
    claim = _claim_run_dir(run_dir, settings, resume, replace) if distributed.is_main() else None
    status = distributed.broadcast_object(claim)
    if status == "up-to-date":
        log.info("%s: %s already trained with these settings; nothing to do", run_dir, name)
        return RunResult(run_dir, status, read_metrics(run_dir), run_dir / MODEL_FILE)
    torch.manual_seed(config.seed)  # a method's own networks (the detector's head) start from the run's seed too
    method = build_method(name, entry, context)
    torch.manual_seed(config.seed)  # and the model from the same state whatever the method drew
    arch = entry.arch or config.model.arch
    model = build_model(arch, context.num_classes, context.input_shape)
    attacks = store.manifest.variants_of_kind("attack")
    sampler = method.sampler_config(entry.data or method.default_data, config.sampler, attacks)
    where = {"location": store.source.location, "storage_options": store.source.storage_options}
    train_loader = open_loader(split="train", sampler_config=sampler, batch_size=config.train.batch_size,
                               num_workers=config.train.num_workers, **where)
    eval_loader = (open_loader(split="test", sampler_config=CLEAN_ONLY, batch_size=config.train.eval_batch_size,
                               shuffle=False, rank=0, world_size=1, **where)
                   if "test" in store.manifest.splits else None)
    writer = MetricsWriter(run_dir, config.train.tensorboard) if distributed.is_main() else None
    resumed = resume and (run_dir / STATE_FILE).is_file()
    if writer is not None and not resumed:
        writer.truncate(0)

    def save_model(state) -> None:
        save_checkpoint(run_dir / MODEL_FILE, method.export(state.model), store.manifest.class_names,
                        {"method": name, "settings": settings["fingerprint"], "epochs": state.epoch,
                         "history": state.history})
        method.save_artifacts(run_dir)

    checkpoint = Checkpointing(run_dir / STATE_FILE, every_steps=config.train.checkpoint_every, resume=resume,
                               on_save=save_model)
    amp = config.train.amp == "bf16" or (config.train.amp == "auto" and device_.type == "cuda")
    log.info("training %s (%s) on %s: %d batches per epoch, data %s, run directory %s", name, arch, device_,
             len(train_loader), entry.data or method.default_data, run_dir)
    try:
        history = fit(model, method, train_loader, optim=config.train, device=device_, eval_loader=eval_loader,
                      progress=progress and distributed.is_main(), amp=amp, augment=entry.augment,
                      seed=config.seed, checkpoint=checkpoint, on_epoch=writer)
    finally:
        if writer is not None:
            writer.close()
    if distributed.is_main():
        atomic_write_json(run_dir / RUN_FILE, {**settings, "status": "finished"})
    return RunResult(run_dir, "resumed" if resumed else "trained", history, run_dir / MODEL_FILE)


def _context(config: Config, store: Store, entry: MethodConfig) -> MethodContext:
    manifest = store.manifest
    checkpoint = Path(config.model.checkpoint)
    return MethodContext(
        variant_names=store.variants,
        variant_kinds={v.name: v.kind for v in manifest.variants},
        checkpoint=checkpoint if checkpoint.is_file() else None,
        arch=entry.arch or config.model.arch, num_classes=len(manifest.class_names),
        input_shape=tuple(manifest.image_shape),  # type: ignore[arg-type]
    )


def _settings(config: Config, name: str, entry: MethodConfig, store: Store, context: MethodContext) -> dict:
    """Everything that decides what a run computes; its fingerprint ties a run directory to them."""
    source_model = None
    if context.checkpoint is not None:
        source_model = load_checkpoint(context.checkpoint)[1].fingerprint
    decided = {
        "method": method_name(name, entry), "entry": name, "params": entry.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", exclude={"runs_dir", "tensorboard", "num_workers"}),
        "sampler": config.sampler.model_dump(mode="json"), "seed": config.seed,
        "arch": context.arch, "store": store.manifest.fingerprint, "source_model": source_model,
    }
    return {**decided, "fingerprint": sha256_json(decided), "store_path": str(store.path),
            "libraries": library_versions()}


def _claim_run_dir(run_dir: Path, settings: dict, resume: bool, replace: bool = False) -> str:
    """Decide what the run directory means for this run; refuse anything that would overwrite another run."""
    record = run_dir / RUN_FILE
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except ValueError:
            raise TrainingError(f"{run_dir}: {RUN_FILE} is damaged; move the directory away or choose --out") from None
        if previous.get("fingerprint") != settings["fingerprint"] and replace:
            log.info("%s: settings changed; training it again", run_dir)
            _clear_run_dir(run_dir)
            previous = {"fingerprint": settings["fingerprint"], "status": "cleared"}
        if previous.get("fingerprint") != settings["fingerprint"]:
            differs = [k for k in ("method", "params", "train", "sampler", "seed", "arch", "store", "source_model")
                       if previous.get(k) != settings[k]]
            raise TrainingError(f"{run_dir}: holds a run made with other settings (differs in: "
                                f"{', '.join(differs) or 'fingerprint'}); choose another --out, or delete it "
                                "to train again")
        if previous.get("status") == "finished":
            return "up-to-date"
        if not resume and previous.get("status") != "cleared":
            raise TrainingError(f"{run_dir}: holds an interrupted run of these settings; add --resume to "
                                "continue it (or delete the directory to start again)")
    elif resume and (run_dir / STATE_FILE).exists():
        raise TrainingError(f"{run_dir}: has a checkpoint but no {RUN_FILE}; it was not made by `advpipe train`")
    elif run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise TrainingError(f"{run_dir}: directory exists and is not a run directory; choose another --out")
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record, {**settings, "status": "running"})
        except OSError as exc:
            raise ConfigError(f"{run_dir}: cannot write the run directory ({exc.strerror or exc}); "
                              "choose a writable --out or train.runs_dir") from None
    return "new"


RUN_PRODUCTS = (RUN_FILE, STATE_FILE, MODEL_FILE, "metrics.jsonl", "calibrater.pt", "tensorboard", "evaluation")


def _clear_run_dir(run_dir: Path) -> None:
    """Remove what `advpipe train` and `advpipe evaluate` wrote in a run directory, and nothing else.

    Only a directory whose run.json `advpipe train` wrote is touched; a link is removed, never followed.
    """
    import shutil

    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not {"fingerprint", "method", "status"} <= record.keys():
        raise TrainingError(f"{run_dir}: is not a run directory of `advpipe train` (its {RUN_FILE} was not written "
                            "by it); nothing was deleted: choose another --out")
    for name in RUN_PRODUCTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
