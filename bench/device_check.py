"""GPU checks of the training half: `advpipe run` + `advpipe train` for five methods, SIGKILL/--resume, pinned loader.

Usage: python bench/device_check.py --device cuda|cpu --out DIR [--deadline S]
Prints one 'PASS name' / 'FAIL name: why' line per check and writes DIR/check.log and DIR/summary.json.
Rehearse here first with --device cpu. Not a benchmark: it lives in bench/ as the one script a
session with a lent GPU runs. The device image has Python 3.12 and torch but lacks pydantic,
ART and advpipe itself: download their wheels into an ignored `.whl/` folder (see the device
tool's README), build advpipe's wheel from the tree, carry `.whl`, and start the command with
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH`. Nothing in it has run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

METHODS = ("clean", "adversarial", "detector", "bang", "calibrater")
RESULTS: list[dict] = []
LOG = None


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.write(msg + "\n")
    LOG.flush()


def record(name: str, ok: bool, detail: str, seconds: float) -> None:
    RESULTS.append({"check": name, "ok": ok, "detail": detail, "seconds": round(seconds, 2)})
    log(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f}s): {detail}")


def cli(*args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("advpipe")
    command = [exe] if exe else [sys.executable, "-c", "import sys; from advpipe.cli import main; sys.exit(main())"]
    env = {**os.environ, **(env_extra or {})}
    t = time.time()
    proc = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)
    log(f"$ advpipe {' '.join(args)}  -> rc {proc.returncode} in {time.time() - t:.1f}s"
        + (f"  [env {env_extra}]" if env_extra else ""))
    LOG.write("--- stdout\n" + proc.stdout[-4000:] + "\n--- stderr\n" + proc.stderr[-6000:] + "\n---\n")
    LOG.flush()
    return proc


def tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or ["<no stderr>"])[-1][:400]


def base_config(root: Path, device: str) -> dict:
    return {
        "name": "gpucheck", "seed": 0, "device": device,
        "source": {"kind": "digits", "image_size": 16, "limit": 256},
        "model": {"arch": "lenet", "checkpoint": str(root / "model.pt")},
        "train_source": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0},
        "store": {"path": str(root / "store"), "shard_size": 128},
        "variants": {"fgsm": {"eps": 0.15}, "bim": {"eps": 0.15, "eps_step": 0.03, "max_iter": 4}, "b2": {}},
        "generation": {"batch_size": 64, "cluster": "inline"},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                  "tensorboard": False, "amp": "auto", "runs_dir": str(root / "runs")},
        "methods": {"clean": {}, "adversarial": {}, "detector": {}, "bang": {"preset": "mnist"},
                    "calibrater": {"variants": ["b2"]}},
    }


def check_env(device: str) -> None:
    import torch

    t = time.time()
    info = f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
    if torch.cuda.is_available():
        info += f", {torch.cuda.get_device_name(0)}"
    import advpipe
    info += f", advpipe at {Path(advpipe.__file__).parent}"
    ok = device != "cuda" or torch.cuda.is_available()
    record("environment", ok, info, time.time() - t)


def check_build(config: Path, device: str, root: Path) -> bool:
    t = time.time()
    proc = cli("run", str(config), "--device", device, timeout=180)
    ok = proc.returncode == 0 and (root / "store" / "manifest.json").is_file() and (root / "model.pt").is_file()
    detail = "source model + store (fgsm, bim, b2) built and verified" if ok else tail(proc)
    if ok:
        manifest = json.loads((root / "store" / "manifest.json").read_text())
        detail += f"; splits {sorted(manifest['splits'])}, variants {[v['name'] for v in manifest['variants']]}"
    record("advpipe run (train-source + generate + verify)", ok, detail, time.time() - t)
    return ok


def check_method(config: Path, device: str, root: Path, method: str) -> None:
    from advpipe.models import load_checkpoint

    t = time.time()
    proc = cli("train", str(config), "--method", method, "--device", device, timeout=180)
    run_dir = root / "runs" / "gpucheck" / method
    ok, detail = proc.returncode == 0, tail(proc)
    if ok:
        try:
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            model, meta = load_checkpoint(run_dir / "model.pt")
            status = json.loads((run_dir / "run.json").read_text())["status"]
            on = [line for line in (proc.stderr + proc.stdout).splitlines() if f"training {method} (" in line]
            where = on[-1].split(") on ", 1)[1].split(":")[0] if on else "?"
            last = lines[-1]
            ok = (status == "finished" and [r["epoch"] for r in lines] == [1] and meta.training["method"] == method
                  and where.startswith(device))
            detail = (f"epochs {[r['epoch'] for r in lines]}, status {status}, trained on {where}, loss "
                      f"{last.get('loss')}, eval_acc {last.get('eval_acc')}, images/s {last.get('images_per_s')}")
        except Exception as exc:  # noqa: BLE001
            ok, detail = False, f"{type(exc).__name__}: {exc}"
    record(f"train --method {method}", ok, detail, time.time() - t)


def check_amp(device: str, root: Path) -> None:
    """The loop's autocast on this device gives bf16 logits (amp auto => bf16 on CUDA)."""
    import torch

    from advpipe.models import load_checkpoint
    from advpipe.trainers.loop import _autocast

    t = time.time()
    try:
        model, _ = load_checkpoint(root / "runs" / "gpucheck" / "clean" / "model.pt")
        dev = torch.device(device)
        model = model.to(dev)
        x = torch.rand(8, 1, 16, 16, device=dev)
        with _autocast(dev, device == "cuda"):
            out = model(x)
        want = torch.bfloat16 if device == "cuda" else torch.float32
        record("bf16 autocast as the loop runs it", out.dtype == want, f"logits dtype {out.dtype} on {dev}",
               time.time() - t)
    except Exception as exc:  # noqa: BLE001
        record("bf16 autocast as the loop runs it", False, f"{type(exc).__name__}: {exc}", time.time() - t)


def check_resume(raw: dict, device: str, root: Path) -> None:
    from advpipe.models import load_checkpoint

    t = time.time()
    raw = {**raw, "train": {**raw["train"], "epochs": 2}}
    config = root / "resume.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = ("train", str(config), "--method", "adversarial", "--device", device)
    killed = cli(*command, "--out", str(root / "cut"), env_extra={"ADVPIPE_FAULT": "epoch-1-saved"})
    state = json.loads((root / "cut" / "run.json").read_text())["status"] if (root / "cut" / "run.json").is_file() \
        else None
    resumed = cli(*command, "--out", str(root / "cut"), "--resume")
    problems = []
    if killed.returncode != -signal.SIGKILL:
        problems.append(f"killed run rc {killed.returncode} (want -9): {tail(killed)}")
    if state != "running":
        problems.append(f"run.json status after kill {state!r} (want 'running')")
    if resumed.returncode != 0:
        problems.append(f"resume rc {resumed.returncode}: {tail(resumed)}")
    detail = ""
    if not problems:
        try:
            model, meta = load_checkpoint(root / "cut" / "model.pt")
            epochs = [json.loads(x)["epoch"] for x in (root / "cut" / "metrics.jsonl").read_text().splitlines()]
            status = json.loads((root / "cut" / "run.json").read_text())["status"]
            if epochs != [1, 2]:
                problems.append(f"resumed metrics epochs {epochs} (want [1, 2])")
            if meta.training.get("epochs") != 2:
                problems.append(f"resumed model.pt says epochs {meta.training.get('epochs')}")
            if status != "finished":
                problems.append(f"run.json status after resume {status!r}")
            detail = f"killed rc -9 after epoch 1, resumed to epoch 2, model.pt loads ({type(model).__name__})"
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{type(exc).__name__}: {exc}")
    record("SIGKILL at epoch-1-saved then --resume", not problems, "; ".join(problems) or detail, time.time() - t)


def compare_uninterrupted(device: str, root: Path) -> None:
    """Informational: the resumed run against an uninterrupted one (CUDA kernels need not be deterministic)."""
    from advpipe.models import load_checkpoint

    t = time.time()
    whole = cli("train", str(root / "resume.yaml"), "--method", "adversarial", "--device", device,
                "--out", str(root / "whole"))
    if whole.returncode != 0 or not (root / "cut" / "model.pt").is_file():
        record("INFO uninterrupted run vs resumed", False, f"rc {whole.returncode}: {tail(whole)}", time.time() - t)
        return
    a, _ = load_checkpoint(root / "whole" / "model.pt")
    b, _ = load_checkpoint(root / "cut" / "model.pt")
    diff = max(float((x.float() - y.float()).abs().max())
               for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    loss = lambda run: [round(json.loads(x)["loss"], 6) for x in  # noqa: E731
                        (root / run / "metrics.jsonl").read_text().splitlines()]
    log(f"INFO uninterrupted vs resumed ({time.time() - t:.1f}s): max weight diff {diff:.3g} "
        f"(bitwise equal {diff == 0.0}); losses whole {loss('whole')} resumed {loss('cut')}")


def check_pinned_loader(device: str, root: Path, num_workers: int) -> None:
    import torch

    from advpipe.models import load_checkpoint
    from advpipe.sampler import open_loader

    t = time.time()
    pin = device == "cuda"
    name = f"map-style loader pin_memory={pin} num_workers={num_workers} feeding {device}"
    try:
        loader = open_loader(root / "store", "train", reader="map", batch_size=64, num_workers=num_workers,
                             pin_memory=pin)
        model, _ = load_checkpoint(root / "model.pt")
        dev = torch.device(device)
        model = model.to(dev).eval()
        seen = correct = batches = 0
        pinned = []
        for batch in loader:
            pinned.append(all(v.is_pinned() for v in batch.tensors().values()) if pin else False)
            moved = batch.to(dev, non_blocking=True)
            with torch.no_grad():
                correct += int((model(moved.x.float()).argmax(1) == moved.y).sum())
            seen += len(moved)
            batches += 1
        if device == "cuda":
            torch.cuda.synchronize()
        ok = batches > 0 and seen > 0 and (all(pinned) if pin else True)
        record(name, ok, f"{batches} batches, {seen} images, {type(loader).__name__}, fields "
                         f"{sorted(batch.tensors())}, all fields pinned in {sum(pinned)}/{len(pinned)} batches, "
                         f"source-model acc on the mix {correct / seen:.3f}", time.time() - t)
    except Exception as exc:  # noqa: BLE001
        LOG.write(traceback.format_exc())
        record(name, False, f"{type(exc).__name__}: {exc}", time.time() - t)


def main() -> int:
    global LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=1e9, help="start no check after this many seconds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    LOG = (args.out / "check.log").open("w")
    start = time.time()
    root = Path(tempfile.mkdtemp(prefix="advpipe-gpucheck-"))
    raw = base_config(root, args.device)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    log(f"work dir {root}")
    check_env(args.device)
    if check_build(config, args.device, root):
        steps = [(f"train --method {m}", lambda m=m: check_method(config, args.device, root, m)) for m in METHODS]
        steps += [("bf16 autocast", lambda: check_amp(args.device, root)),
                  ("SIGKILL + --resume", lambda: check_resume(raw, args.device, root)),
                  ("pinned loader, 0 workers", lambda: check_pinned_loader(args.device, root, 0)),
                  ("pinned loader, 2 workers", lambda: check_pinned_loader(args.device, root, 2)),
                  ("INFO uninterrupted vs resumed", lambda: compare_uninterrupted(args.device, root))]
        for name, step in steps:
            if time.time() - start > args.deadline:
                log(f"SKIP {name}: past the {args.deadline:.0f}s deadline")
                continue
            step()
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    log(f"TOTAL {len(RESULTS) - len(failed)}/{len(RESULTS)} passed in {time.time() - start:.1f}s"
        + (f"; failed: {failed}" if failed else ""))
    (args.out / "summary.json").write_text(json.dumps({"device": args.device, "results": RESULTS,
                                                       "seconds": round(time.time() - start, 1)}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
