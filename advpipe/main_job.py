"""`advpipe run CONFIG`: the main job, from source images to a comparison of training methods.

    [1/6] train the source model (the white-box model every attack runs against)
    [2/6] generate the train and test store with every variant
    [3/6] verify the store
    [4/6] train every method the config lists (`methods`)
    [5/6] evaluate each trained model on the store's test split
    [6/6] write the comparison report and print its headline table

Each step is reused when its output is up to date: the source model and store by their
fingerprints, a run directory by its settings (a changed method setting retrains that method
only), an evaluation by the fingerprints of the model and store it measured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from advpipe.config import Config
from advpipe.errors import ConfigError

log = logging.getLogger(__name__)

STEPS = 6


@dataclass
class JobOptions:
    device: str | None = None
    cluster: str | None = None
    scheduler: str | None = None
    force: bool = False
    progress: bool = True


def run_main_job(config: Config, options: JobOptions, say: Callable[[str], None]) -> int:
    """Run every step; returns the exit status (3 when the store fails verification)."""
    from advpipe.pipeline.job import generate
    from advpipe.stores import verify_store
    from advpipe.trainers.clean import source_model_is_current, train_source

    check_outputs(config)
    if source_model_is_current(config):
        say(f"[1/{STEPS}] source model {config.model.checkpoint} is up to date")
    else:
        path, metrics = train_source(config, device=options.device, progress=options.progress)
        say(f"[1/{STEPS}] source model written to {path}: test accuracy {metrics['test_acc']:.4f}")
    outcome = generate(config, cluster=options.cluster, scheduler=options.scheduler, force=options.force,
                       device=options.device, progress=options.progress)
    say(f"[2/{STEPS}] store {config.store.path} {outcome.status}: {outcome.computed} shard(s) computed, "
        f"{outcome.reused} reused")
    report = verify_store(config.store.path, progress=options.progress, storage_options=_options(config))
    if not report.ok:
        for problem in report.problems:
            say(f"FAIL {problem}")
        return 3
    say(f"[3/{STEPS}] store verified: {report.shards} shards, {report.samples} samples")
    run_dirs = train_methods(config, options, say)
    evaluations = evaluate_runs(config, run_dirs, options, say)
    say(write_comparison(config, evaluations, say))
    return 0


def output_paths(config: Config) -> tuple[Path, dict[str, Path]]:
    """What the job writes: the source model file, and the local folders (store, one per method, the report)."""
    base = config.train.runs_dir / config.name
    store = config.store.path  # a URL (a str) is written by its object store, not checked here
    folders = {"store.path": store} if isinstance(store, Path) else {}
    folders.update({f"the run folder of method '{name}'": base / name for name in config.methods})
    folders["the report folder"] = base / "report"
    return Path(config.model.checkpoint), folders


def check_outputs(config: Config) -> None:
    """Refuse, before hours of training, outputs that cannot be written or that would clobber each other.

    Each must be absent or of its kind (a file for the checkpoint, folders for the rest) and lie below a
    writable folder; no folder may hold another output, since a folder is cleared when it is redone (a
    checkpoint inside the store would be deleted by `--force`, a method named `report` would share a folder).
    """
    from advpipe.stores.writer import check_store_path

    checkpoint, folders = output_paths(config)
    if "store.path" in folders:  # names and paths the file system can hold, before anything is touched
        check_store_path(folders["store.path"], config.store.backend)
    _check_writable(checkpoint, "model.checkpoint", want_dir=False)
    for what, folder in folders.items():
        _check_writable(folder, what, want_dir=True)
    resolved = {what: folder.resolve() for what, folder in folders.items()}
    for what, folder in resolved.items():
        if checkpoint.resolve().is_relative_to(folder):
            raise ConfigError(f"model.checkpoint {checkpoint} lies inside {what} ({folders[what]}), which is "
                              "cleared when it is redone; move one of them")
        for other, place in resolved.items():
            if other != what and place.is_relative_to(folder):
                raise ConfigError(f"{other} ({folders[other]}) lies inside {what} ({folders[what]}); each "
                                  "output needs a folder of its own (rename the method or move store.path)")


def _check_writable(path: Path, what: str, want_dir: bool) -> None:
    """An existing output must be of its kind (an up-to-date one may be read-only); a new one creatable."""
    if path.exists():
        if path.is_dir() != want_dir:
            kind = "a folder" if want_dir else "a file"
            raise ConfigError(f"{what} {path} exists but is not {kind}; choose another path or remove it")
        return
    folder = next((parent for parent in path.resolve().parents if parent.exists()), Path("/"))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written ({folder} is not a writable folder); choose another "
                          "path")


def train_methods(config: Config, options: JobOptions, say: Callable[[str], None]) -> dict[str, Path]:
    from advpipe.trainers.run import train

    if not config.methods:
        say(f"[4/{STEPS}] the config lists no methods: nothing to train")
        return {}
    run_dirs = {}
    for index, name in enumerate(config.methods, 1):
        result = train(config, name, device=options.device, progress=options.progress, replace=True)
        accuracy = result.history[-1].get("eval_acc") if result.history else None
        shown = f", clean test accuracy {accuracy:.4f}" if accuracy is not None else ""
        say(f"[4/{STEPS}] method {index}/{len(config.methods)} {name}: {result.status}{shown}")
        run_dirs[name] = result.run_dir
    return run_dirs


def evaluate_runs(config: Config, run_dirs: dict[str, Path], options: JobOptions,
                  say: Callable[[str], None]) -> list[Path]:
    """Evaluate each run on the store's test split; an evaluation newer than its model, of the same store
    and settings, is reused."""
    from advpipe.stores import open_store
    from advpipe.trainers.evaluate import default_out, evaluate
    from advpipe.trainers.report import load_evaluation

    fingerprint = open_store(config.store.path, storage_options=_options(config)).manifest.fingerprint
    settings = config.evaluation.model_dump(mode="json")
    outs = []
    for index, (name, run_dir) in enumerate(run_dirs.items(), 1):
        out = default_out(run_dir)
        previous = _readable(load_evaluation, out)
        current = (previous is not None and previous["store"]["fingerprint"] == fingerprint
                   and previous["config"] == settings
                   and (out / "evaluation.json").stat().st_mtime >= (run_dir / "model.pt").stat().st_mtime)
        if current:
            say(f"[5/{STEPS}] evaluation {index}/{len(run_dirs)} {name}: up to date")
        else:
            result = evaluate(run_dir, config.store.path, storage_options=_options(config), config=config.evaluation,
                              out=out, device=options.device, progress=options.progress)
            say(f"[5/{STEPS}] evaluation {index}/{len(run_dirs)} {name}: "
                f"{result.record['wall_time_s']['total']:.0f} s")
        outs.append(out)
    return outs


def write_comparison(config: Config, evaluations: list[Path], say: Callable[[str], None]) -> str:
    """The comparison report of every evaluated run; returns the headline table to print."""
    from advpipe.trainers.report import headline, load_evaluation, name_records, write_report

    if not evaluations:
        return f"[6/{STEPS}] nothing to compare"
    out = write_report(evaluations, config.train.runs_dir / config.name / "report")
    models = name_records([load_evaluation(path) for path in evaluations])
    say(f"[6/{STEPS}] report written to {out / 'report.md'} (also report.json and plots)")
    return "\n" + headline(models)


def _readable(load: Callable[[Path], dict], path: Path) -> dict | None:
    from advpipe.errors import AdvpipeError

    try:
        return load(path)
    except AdvpipeError:
        return None


def _options(config: Config) -> dict:
    """The fsspec options of the config's store (its endpoint_url and storage_options keys)."""
    from advpipe.urls import config_storage_options

    return config_storage_options(config.store.path, config.store)
