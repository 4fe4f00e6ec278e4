"""The `advpipe` command line: one subcommand per step of the workflow.

    advpipe run CONFIG            the main job: source model, store, methods trained and evaluated, report
    advpipe train-source CONFIG   train the white-box source model the attacks run against
    advpipe train CONFIG --method NAME    train one method from the store into a run directory
    advpipe generate CONFIG       fill a store with every variant of every image (Dask)
    advpipe inspect STORE         a readable card of a store (--grid out.png for a picture)
    advpipe verify STORE          checksums, counts, shapes; non-zero exit naming bad shards
    advpipe convert SRC DST       rewrite a store with the other backend
    advpipe publish STORE URL     upload a store to object storage (s3://, gs://, az://), verified, resumable
    advpipe fetch URL DIR         download a store from object storage (or http://), verified, resumable
    advpipe sample STORE          what the sampler would yield under a policy
    advpipe evaluate CHECKPOINT_OR_RUN_DIR --store STORE   robustness of a model on a store's test split
    advpipe report RUN_DIR [RUN_DIR ...] --out DIR         evaluated runs side by side
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from advpipe.errors import AdvpipeError, UsageError

log = logging.getLogger("advpipe")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable:
    def register(function: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = function
        return function

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advpipe",
        description="Precompute adversarial variants of training images into sharded stores, and train on them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `advpipe COMMAND --help` for the options of one command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", type=Path, help="YAML config, e.g. configs/digits.yaml")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's device)")
        return p

    run = config_command("run", "Main job: source model, store, every method trained and evaluated, a report.")
    _generation_options(run)
    config_command("train-source", "Train the white-box source model (plain cross-entropy) and save its checkpoint.")
    train = config_command("train", "Train one method (config `methods`) from the store into a run directory.")
    train.add_argument("--method", required=True,
                       help="an entry of the config's `methods`, or a method name: clean, adversarial, dynamic, "
                            "detector, calibrater, bang, perturbation_bias, weight_map")
    train.add_argument("--out", type=Path, default=None,
                       help="run directory (default: train.runs_dir/NAME/METHOD from the config)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    generate = config_command("generate", "Generate every variant of every image into the config's store.")
    _generation_options(generate)

    inspect = sub.add_parser("inspect", help="Print a readable card of a store.", description="Print a store's card.")
    inspect.add_argument("store", help="store directory or URL (http://..., s3://..., any fsspec URL)")
    inspect.add_argument("--grid", type=Path, default=None,
                         help="also draw images x variants into this PNG (or .pdf, .svg), outside the store")
    inspect.add_argument("--split", default="train", help="split drawn by --grid (default: train)")
    inspect.add_argument("-n", "--count", type=int, default=8, help="images drawn by --grid (1 to 64, default: 8)")

    verify = sub.add_parser("verify", help="Verify checksums, counts and shapes of every shard.",
                            description="Verify a store; exits 3 and names each bad shard if any.")
    verify.add_argument("store", help="store directory or URL (http://..., s3://..., any fsspec URL)")

    sample = sub.add_parser("sample", help="Show what the sampler would yield under a policy.",
                            description="Run the sampler's policy over a store without training: expected vs "
                                        "realised variant frequencies, per-batch adversarial fractions.")
    sample.add_argument("store", help="store directory or URL (http://..., s3://..., any fsspec URL)")
    sample.add_argument("--config", type=Path, required=True, help="YAML config whose `sampler` section is used")
    sample.add_argument("--split", default="train")
    sample.add_argument("--batches", type=int, default=20, help="batches to draw (default: 20)")
    sample.add_argument("--grid", type=Path, default=None,
                        help="also draw the first batch into this PNG (or .pdf, .svg), outside the store")

    evaluate = sub.add_parser(
        "evaluate", help="Measure a model on a store's test split (robustness, noise, corruptions).",
        description="Measure a checkpoint or run directory on a store's test split: accuracy on every stored "
                    "variant, white-box FGSM, minimal FGSM and blank gradients, AutoAttack, DeepFool, noise and "
                    "corruptions; writes evaluation.json, evaluation.md and plots (docs/REPORT.md).")
    evaluate.add_argument("target", type=Path, help="a model checkpoint (.pt) or a run directory of `advpipe train`")
    evaluate.add_argument("--store", required=True, help="store whose test split is measured (directory or URL)")
    evaluate.add_argument("--out", type=Path, default=None,
                          help="output directory (default: RUN_DIR/evaluation, or NAME-evaluation beside a file)")
    evaluate.add_argument("--config", type=Path, default=None,
                          help="YAML config whose `evaluation` section sets what is measured (default: the defaults)")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's, or auto)")

    report = sub.add_parser("report", help="Put several evaluated runs side by side.",
                            description="Compare evaluated runs: report.md, report.json (docs/REPORT.md) and plots.")
    report.add_argument("runs", nargs="+", type=Path,
                        help="run directories with evaluation/evaluation.json, or evaluation directories")
    report.add_argument("--out", type=Path, required=True, help="directory for report.md, report.json and plots")

    convert = sub.add_parser("convert", help="Rewrite a store with another backend.",
                             description="Rewrite a store with another backend; stored values are unchanged.")
    convert.add_argument("source", help="store directory or URL to convert")
    convert.add_argument("target", type=Path)
    convert.add_argument("--to", choices=["hdf5", "webdataset"], required=True, dest="backend")
    convert.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="HDF5 only")
    convert.add_argument("--force", action="store_true", help="replace an existing store at TARGET")
    _transfer_commands(sub)
    return parser


def _transfer_commands(sub) -> None:
    publish = sub.add_parser(
        "publish", help="Upload a store to object storage, verifying every object.",
        description="Upload a finished store (shards, then its README.md card, then the manifest last), reading "
                    "every object back to verify it. Re-running an interrupted publish keeps what verifies. "
                    "Credentials and the endpoint come from the provider's standard environment variables, "
                    "config files or profiles (docs/OBJECT_STORAGE.md).")
    publish.add_argument("store", help="store directory (or URL) to publish")
    publish.add_argument("url", help="target: s3://bucket/prefix/name (any S3-compatible service), gs://, az://")
    publish.add_argument("--force", action="store_true", help="replace a different store already at URL")
    publish.add_argument("--workers", type=int, default=4, help="objects transferred at once (default: 4)")
    fetch = sub.add_parser(
        "fetch", help="Download a store from object storage, verifying every shard.",
        description="Download a store into a local directory, checking each shard's sha256 as it arrives; the "
                    "manifest is written last. Re-running an interrupted fetch keeps what verifies.")
    fetch.add_argument("url", help="store URL (s3://, gs://, az://, http(s)://) or directory")
    fetch.add_argument("directory", type=Path, help="local directory for the copy")
    fetch.add_argument("--force", action="store_true", help="replace a different store already in DIRECTORY")
    fetch.add_argument("--workers", type=int, default=4, help="objects transferred at once (default: 4)")


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", default=None,
                        help="local (one worker process per core), local:N (N worker processes), inline (no "
                             "Dask, in this process) or slurm (dask-jobqueue, see docs/CLUSTER.md)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--force", action="store_true", help="replace a store made with a different fingerprint")


@command("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    from advpipe.stores import open_store
    from advpipe.stores.inspect import card, grid

    if args.grid:
        check_grid_target(args.grid, args.store, args.count)
    store = open_store(args.store, verify="size")
    print(card(store.manifest, store.path))
    if args.grid:
        print(f"\ngrid written to {grid(store, args.grid, args.split, args.count)}")
    return 0


#: what a grid is drawn into (matplotlib picks the format by suffix) and how many rows it may have
GRID_SUFFIXES = (".png", ".pdf", ".svg")
MAX_GRID_ROWS = 64


def check_grid_target(out: Path, store: str | Path, rows: int) -> None:
    """Refuse a --grid target before any work: a row count outside [1, MAX_GRID_ROWS], an unsupported
    suffix, a directory, a place that cannot hold a file, or anything inside the store (never overwrite a
    store's files, nor add foreign ones)."""
    if not 1 <= rows <= MAX_GRID_ROWS:
        raise UsageError(f"--grid draws 1 to {MAX_GRID_ROWS} images (-n/--count), got {rows}")
    if out.suffix.lower() not in GRID_SUFFIXES:
        raise UsageError(f"--grid {out}: give a file name ending in {', '.join(GRID_SUFFIXES)}")
    if out.is_dir():
        raise UsageError(f"--grid {out}: is a directory; give a file name such as {out / 'grid.png'}")
    if "://" not in str(store) and out.resolve().is_relative_to(Path(store).resolve()):
        raise UsageError(f"--grid {out}: lies inside the store {store}, whose files must not be touched; "
                         "draw the grid elsewhere")
    folder = next(parent for parent in out.resolve().parents if parent.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--grid {out}: cannot be written ({folder} is not a writable directory)")


@command("verify")
def cmd_verify(args: argparse.Namespace) -> int:
    from advpipe.stores.source import ShardSource

    source = ShardSource(args.store)
    if not source.has_manifest():
        source.manifest()  # raises: no directory or an unfinished store is bad input (2), not corruption (3)
    return _verify(args.store)


def _verify(store: Path | str, prefix: str = "") -> int:
    """Print the verification result; 0 when the store is sound, 3 (naming each bad shard) when not."""
    from advpipe.stores import verify_store

    report = verify_store(store, progress=sys.stderr.isatty())
    for problem in report.problems:
        print(f"FAIL {problem}", file=sys.stderr)
    store = report.store  # as the user may see it: a URL's credentials are redacted
    if not report.ok:
        print(f"{prefix}{store}: {len(report.problems)} problem(s) in {report.shards} shards; restore the named "
              "shards from a good copy, or regenerate: `advpipe generate CONFIG --force`", file=sys.stderr)
        return 3
    print(f"{prefix}{store}: OK, {report.shards} shards, {report.samples} samples verified")
    return 0


@command("sample")
def cmd_sample(args: argparse.Namespace) -> int:
    from advpipe.config import load_config
    from advpipe.sampler.report import describe_policy, sample_grid

    if args.batches < 1:
        raise UsageError(f"--batches must be at least 1, got {args.batches}")
    if args.grid:
        check_grid_target(args.grid, args.store, 1)
    config = load_config(args.config)
    print(describe_policy(args.store, args.split, config.sampler, args.batches))
    if args.grid:
        print(f"\ngrid written to {sample_grid(args.store, args.split, config.sampler, args.grid)}")
    return 0


@command("convert")
def cmd_convert(args: argparse.Namespace) -> int:
    from advpipe.stores import convert_store

    manifest = convert_store(args.source, args.target, args.backend, args.compression, overwrite=args.force,
                             progress=sys.stderr.isatty())
    print(f"{args.target}: {manifest.backend} store written ({sum(s.count for s in manifest.splits.values())} images)")
    return 0


@command("publish")
def cmd_publish(args: argparse.Namespace) -> int:
    from advpipe.stores.transfer import publish

    report = publish(args.store, args.url, force=args.force, workers=args.workers, progress=sys.stderr.isatty())
    print(report.summary("published"))
    return 0


@command("fetch")
def cmd_fetch(args: argparse.Namespace) -> int:
    from advpipe.stores.transfer import fetch

    report = fetch(args.url, args.directory, force=args.force, workers=args.workers, progress=sys.stderr.isatty())
    print(report.summary("fetched"))
    return 0


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from advpipe.config import load_config
    from advpipe.stores.inspect import card
    from advpipe.urls import redact

    config = load_config(args.config)
    outcome, message = _generate(args, config)
    print(message)
    print(card(outcome.manifest, redact(config.store.path)))
    return 0


@command("run")
def cmd_run(args: argparse.Namespace) -> int:
    """The main job (advpipe.main_job); each step is skipped when its output is already up to date."""
    from advpipe.config import load_config
    from advpipe.main_job import JobOptions, run_main_job

    options = JobOptions(device=args.device, cluster=args.cluster, scheduler=args.scheduler, force=args.force)
    return run_main_job(load_config(args.config), options, lambda line: print(line, flush=True))


def _generate(args: argparse.Namespace, config):
    from advpipe.pipeline.job import generate

    outcome = generate(config, cluster=args.cluster, scheduler=args.scheduler, force=args.force, device=args.device)
    from advpipe.urls import redact

    if outcome.status == "up-to-date":
        return outcome, f"store {redact(config.store.path)} is up to date with {args.config}: nothing to do"
    return outcome, (f"store {redact(config.store.path)} {outcome.status}: {outcome.computed} shard(s) computed, "
                     f"{outcome.reused} reused")


def _train_source(args: argparse.Namespace, config) -> str:
    from advpipe.trainers.clean import train_source

    path, metrics = train_source(config, device=args.device)
    return f"source model written to {path}: test accuracy {metrics['test_acc']:.4f}"


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    from advpipe.config import load_config
    from advpipe.trainers import distributed
    from advpipe.trainers.run import train

    try:
        result = train(load_config(args.config), args.method, out=args.out, resume=args.resume, device=args.device)
        main_rank = distributed.is_main()
    finally:
        distributed.shutdown()
    if main_rank:
        last = result.history[-1] if result.history else {}
        accuracy = last.get("eval_acc")
        print(f"{args.method}: {result.status}; model {result.model_path}"
              + (f", test accuracy (clean) {accuracy:.4f}" if accuracy is not None else ""))
    return 0


@command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from advpipe.config import EvaluationConfig, load_config
    from advpipe.trainers.evaluate import evaluate
    from advpipe.trainers.report import headline

    config = load_config(args.config) if args.config else None
    device = args.device or (config.device if config else "auto")
    result = evaluate(args.target, args.store, config=config.evaluation if config else EvaluationConfig(),
                      out=args.out, device=device, progress=sys.stderr.isatty())
    print(headline({result.record["name"]: result.record}))
    print(f"\nevaluation written to {result.out}")
    return 0


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    from advpipe.trainers.report import write_report

    out = write_report(args.runs, args.out)
    print(f"report of {len(args.runs)} run(s) written to {out / 'report.md'} and {out / 'report.json'}")
    return 0


@command("train-source")
def cmd_train_source(args: argparse.Namespace) -> int:
    from advpipe.config import load_config

    print(_train_source(args, load_config(args.config)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:  # Dask reads this when it is first imported; its INFO lines are noise to a user
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        for noisy in ("distributed", "art"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from advpipe.urls import RedactingFilter, redact

    for chatty in ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "urllib3"):  # debug lines carry headers
        logging.getLogger(chatty).setLevel(logging.WARNING)

    for handler in logging.getLogger().handlers:  # no URL credential reaches a log line
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        return COMMANDS[args.command](args)
    except AdvpipeError as exc:
        print(f"advpipe {args.command}: error: {redact(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"advpipe {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
