"""Sources bigger than memory (issue 20): generation from lazy sources at N and 8N images, in one run.

    python bench/scale.py                       # N = 44,000: 8N = 352,000 images, 4.03 GiB decoded
    python bench/scale.py --images 2000         # a quick run
    python bench/scale.py --work /data/scale    # sources written once there and reused

The bench writes its own synthetic source (64x64 RGB, a per-class oriented coloured grating plus
Gaussian noise, deterministic by --seed, PNG-encoded, about 10 KB each; labels cycle through 10
classes) in three forms: an image folder (train/<class>/*.png, test/<class>/*.png) and WebDataset tar
shards (--per-shard images each, <key>.png + <key>.cls, train/ and test/ subfolders), both at N and
8N training images, and the N-image set as an .npz (the in-memory path, refused above 4 GiB decoded).
A small test split (N/50 images) exists in every form, as a predefined split does; only the train
split is generated. Sources are reused from --work when already written.

Each configuration runs `advpipe.pipeline.job.generate` in a subprocess of its own (so each client's
peak RSS is its own) on a LocalCluster it starts itself: --cluster local:2 -> 2 worker processes, one
thread each, reached through `generate(..., scheduler=ADDRESS)`, which indexes lazy sources on those
workers as --cluster local:2 would. Variants: gaussian (sigma 0.05) and fgsm (eps 0.03) on a LeNet
trained for --train-steps Adam steps at 64x64 (its accuracy does not matter here); store precision --precision
(float16). generation.statistics is off unless --statistics: its five extra LeNet passes per image
(about half the per-image cost at 64x64) are the same for every source, so they only dilute the
lazy-vs-in-memory comparison, and with them the 8N runs take twice as long.
The configurations: npz at N, image folder at N and 8N, WebDataset at N and 8N; the N ones run
--rounds times (2), before and after the 8N ones, and the ratios take the best rate and the highest
peak RSS of their rounds, since the machine may be shared. Each run reports:

  index      listing, indexing and fingerprinting the split: the client's source read (every
             configuration has an index cache of its own, so every run indexes; npz: loading it)
  wall       the whole generate call (index pass included; cluster start-up and the workers' first
             import of torch are not: the workers import the pipeline before the clock starts)
  img/s      training images / wall
  cpu        the workers' user + system CPU time per image during generate: unlike wall time, it
             hardly moves when other processes share the machine
  peak RSS   the client's (client, scheduler and nannies: one process) and each worker's, measured
             before the cluster closes (workers: client.run). 'own' is VmHWM from /proc, the peak of
             the process's own pages; 'ru_maxrss' is getrusage(RUSAGE_SELF).ru_maxrss, which on Linux
             also counts the parent's peak at the time the process was spawned (kept across exec), so
             the client's ru_maxrss is at least this bench's own peak when it started the subprocess
  store      bytes on disk per training image (manifest, shards, records), and per array of a shard
  verified   advpipe.stores.verify.verify_store(path).ok on the finished store; the store is then deleted

Targets (issue 20):
  1. peak RSS at 8N / at N <= 1.2, for the client and for the workers (lazy sources; own peaks);
  2. images/s of the lazy image folder and the lazy WebDataset >= 0.8 x the in-memory npz at N;
  3. the 8N runs (decoded > 4 GiB, more than the in-memory path accepts) complete and verify.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

SIZE = 64
CLASSES = [f"c{i}" for i in range(10)]
VARIANTS = {"gaussian": {"sigma": 0.05}, "fgsm": {"eps": 0.03}}
GIB, MIB = 1 << 30, 1 << 20
FORMAT = 1  # bump when the written sources change, so old ones are not reused as new ones


# --------------------------------------------------------------------------- synthetic sources


def synth(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 64, 64, 3): per class an oriented grating in a class colour, a random phase, plus noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    angle = (labels * np.pi / 10)[:, None, None]
    freq = (2 + labels % 4)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, len(labels))[:, None, None]
    grating = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    colour = np.stack([(np.sin(labels * 1.3 + k * 2.1) + 1) / 2 for k in range(3)], -1)[:, None, None, :]
    noise = rng.standard_normal((len(labels), SIZE, SIZE, 3), dtype=np.float32) * 12
    return np.clip(128 + 90 * grating[..., None] * colour + noise, 0, 255).astype(np.uint8)


def block_images(seed: int, split: str, block: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, block])
    labels = (first + np.arange(count)) % len(CLASSES)
    return synth(labels, rng), labels


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_block(task: tuple) -> int:
    """One block of images: its files in the folder, then its tar shard (whose presence marks the block done)."""
    root, seed, split, block, first, count = task
    root = Path(root)
    tar = root / "wds" / split / f"{split}-{block:06d}.tar"
    if tar.is_file():
        return count
    images, labels = block_images(seed, split, block, first, count)
    tar.parent.mkdir(parents=True, exist_ok=True)
    partial = tar.with_name(f".{tar.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as archive:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            data, key = png(image), f"{first + i:07d}"
            path = root / "folder" / split / CLASSES[label] / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            for name, payload in ((f"{key}.png", data), (f"{key}.cls", str(int(label)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    os.replace(partial, tar)
    return count


def synth_block(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    _, seed, split, block, first, count = task
    return block_images(seed, split, block, first, count)


def blocks(root: Path, seed: int, split: str, count: int, per_shard: int) -> list[tuple]:
    return [(str(root), seed, split, b, first, min(per_shard, count - first))
            for b, first in enumerate(range(0, count, per_shard))]


def test_count(train: int) -> int:
    return max(100, train // 50)


def write_set(work: Path, train: int, seed: int, per_shard: int, npz: bool, processes: int) -> Path:
    """The image folder and WebDataset shards of `train` + test images (and the .npz): written once, then reused."""
    from multiprocessing import get_context

    from tqdm import tqdm

    root = work / f"set-{train}"
    identity = {"format": FORMAT, "train": train, "test": test_count(train), "seed": seed, "per_shard": per_shard,
                "size": SIZE, "npz": npz}
    done = root / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == identity:
        print(f"sources: reusing {root}")
        return root
    if done.is_file() or (root.exists() and not (root / "partial.json").is_file()):
        shutil.rmtree(root)  # another size, seed or format: start over
    root.mkdir(parents=True, exist_ok=True)
    partial = root / "partial.json"
    if partial.is_file() and json.loads(partial.read_text()) != identity:
        shutil.rmtree(root)
        root.mkdir(parents=True)
    partial.write_text(json.dumps(identity))
    tasks = [*blocks(root, seed, "train", train, per_shard), *blocks(root, seed, "test", test_count(train), per_shard)]
    with get_context("fork").Pool(processes) as pool:
        with tqdm(total=train + test_count(train), desc=f"writing {root.name} (folder + tar)", unit="img") as bar:
            for count in pool.imap_unordered(write_block, tasks):
                bar.update(count)
        if npz:
            arrays = {}
            for split in ("train", "test"):
                parts = list(tqdm(pool.imap(synth_block, [t for t in tasks if t[2] == split]),
                                  total=sum(t[2] == split for t in tasks), desc=f"npz {split}", unit="block"))
                arrays[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            np.savez(root / ".source.npz", x=arrays["train"][0], y=arrays["train"][1], x_test=arrays["test"][0],
                     y_test=arrays["test"][1], class_names=np.array(CLASSES))
            os.replace(root / ".source.npz", root / "source.npz")
            del arrays
    partial.unlink()
    done.write_text(json.dumps(identity))
    return root


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the source model


def train_model(path: Path, seed: int, steps: int) -> None:
    """A LeNet at 64x64x3, trained for `steps` Adam steps on synthetic images (accuracy does not matter here)."""
    import torch
    import torch.nn.functional as F

    from advpipe.models import build_model, save_checkpoint

    if path.is_file():
        return
    torch.manual_seed(seed)
    model = build_model("lenet", len(CLASSES), (3, SIZE, SIZE))
    images, labels = block_images(seed + 1, "train", 0, 0, 2048)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    y = torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.003)
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[:512]).argmax(1) == y[:512]).float().mean())
    save_checkpoint(path, model, CLASSES, {"bench": "scale", "steps": steps, "train_acc": accuracy})
    print(f"model: lenet 64x64x3, {steps} Adam steps in {time.perf_counter() - started:.0f} s, "
          f"train accuracy {accuracy:.2f}")


# --------------------------------------------------------------------------- one configuration (subprocess)


def run_config(spec: dict) -> dict:
    """Generate one store in this process, measure it, verify it and delete it; see the module docstring."""
    os.environ["ADVPIPE_CACHE_DIR"] = spec["cache"]
    logging.basicConfig(filename=spec["log"], level=logging.INFO, force=True,
                        format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from distributed import Client, LocalCluster

    import advpipe.pipeline.job as job
    from advpipe.config import config_from_dict
    from advpipe.pipeline.cluster import local_workers
    from advpipe.stores.verify import verify_store

    store = Path(spec["store"])
    raw = {
        "name": f"scale-{spec['label']}", "seed": 0, "device": "cpu",
        "source": spec["source"],
        "model": {"arch": "lenet", "checkpoint": spec["model"]},
        "store": {"path": str(store), "shard_size": spec["shard_size"], "splits": ["train"],
                  "precision": spec["precision"]},
        "variants": VARIANTS,
        "generation": {"batch_size": spec["batch_size"], "threads_per_worker": 1, "statistics": spec["statistics"]},
    }
    config = config_from_dict(raw)
    index_seconds = []
    original = job._read_source

    def timed(config, split, runner):
        started = time.perf_counter()
        try:
            return original(config, split, runner)
        finally:
            index_seconds.append(time.perf_counter() - started)

    job._read_source = timed
    workers = local_workers(spec["cluster"])
    result: dict = {"label": spec["label"], "kind": spec["source"]["kind"], "images": spec["images"]}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(__import__, "advpipe.pipeline.worker")  # torch and the pipeline, before the clock starts
        before, client_before = client.run(cpu_seconds), cpu_seconds()
        started = time.perf_counter()
        outcome = job.generate(config, scheduler=cluster.scheduler_address, progress=False)
        result["wall"] = time.perf_counter() - started
        result["client_cpu"] = [a - b for a, b in zip(cpu_seconds(), client_before, strict=True)]
        result["client_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["client_hwm"] = vm_hwm()
        peaks, after = client.run(worker_peaks), client.run(cpu_seconds)
        result["workers"] = [{**peaks[address], "cpu": [a - b for a, b in zip(after[address], before[address],
                                                                              strict=True)]}
                             for address in sorted(peaks)]
    result["index"] = sum(index_seconds)
    result["status"] = outcome.status
    stats = outcome.manifest.splits["train"].stats
    result["gen_seconds"] = {name: stats[name].seconds for name in VARIANTS}
    result["success"] = {name: stats[name].success_rate for name in VARIANTS}
    result["clean_correct"] = stats["gaussian"].clean_correct
    result["store_bytes"] = tree_bytes(store)
    result["arrays"] = shard_arrays(store)
    started = time.perf_counter()
    report = verify_store(store)
    result["verify_seconds"] = time.perf_counter() - started
    result["verified"] = bool(report.ok)
    result["problems"] = [str(p) for p in report.problems[:3]]
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(spec["cache"], ignore_errors=True)
    return result


def vm_hwm() -> int:
    """This process's own peak RSS in bytes (VmHWM: its current address space only, nothing inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    times = os.times()
    return times.user, times.system


def worker_peaks() -> dict:
    import resource as r

    return {"maxrss": r.getrusage(r.RUSAGE_SELF).ru_maxrss * 1024, "hwm": vm_hwm()}


def shard_arrays(store: Path) -> dict:
    """Bytes per image of each array of the first train shard (h5py storage sizes); per variant for stacked ones."""
    import h5py

    shards = sorted((store / "train").glob("*.h5")) if (store / "train").is_dir() else []
    if not shards:
        return {}
    arrays = {}
    with h5py.File(shards[0], "r") as handle:
        count = len(handle["ids"])
        variants = [str(v) for v in handle.attrs["variants"]]
        for name, dataset in handle.items():
            size = dataset.id.get_storage_size() / count
            stacked = dataset.ndim == 5 and dataset.shape[1] == len(variants)
            arrays[name] = {"per_image": size, "per_variant": size / len(variants) if stacked else None,
                            "dtype": str(dataset.dtype), "shape": list(dataset.shape[1:])}
        arrays["_file_per_image"] = shards[0].stat().st_size / count
    return arrays


# --------------------------------------------------------------------------- the parent


def configurations(work: Path, sets: dict[int, Path], n: int, eight: int) -> list[tuple[str, dict, int]]:
    wds = {"class_names": CLASSES}
    return [
        ("npz N", {"kind": "npz", "path": str(sets[n] / "source.npz")}, n),
        ("imagefolder N", {"kind": "imagefolder", "path": str(sets[n] / "folder")}, n),
        ("webdataset N", {"kind": "webdataset", "path": str(sets[n] / "wds"), **wds}, n),
        ("imagefolder 8N", {"kind": "imagefolder", "path": str(sets[eight] / "folder")}, eight),
        ("webdataset 8N", {"kind": "webdataset", "path": str(sets[eight] / "wds"), **wds}, eight),
    ]


def store_estimate(images: int, precision: str) -> int:
    item = {"float16": 2, "float32": 4, "uint8": 1}[precision]
    return int(images * SIZE * SIZE * 3 * (1 + len(VARIANTS) * item) * 1.05)


def run_child(spec: dict, work: Path) -> dict:
    free = shutil.disk_usage(work).free
    need = store_estimate(spec["images"], spec["precision"])
    if need > 0.6 * free:
        raise SystemExit(f"{spec['label']}: its store needs about {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free at "
                         f"{work}; free disk space or use a smaller --images")
    process = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        sys.stderr.write(process.stderr[-4000:])
        return {"label": spec["label"], "kind": spec["source"]["kind"], "images": spec["images"],
                "error": f"exit {process.returncode}: {process.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def mib(value: float) -> str:
    return f"{value / MIB:.0f}"


def worker_cpu(result: dict) -> float:
    """The workers' CPU seconds (user + system) during generate, summed."""
    return sum(sum(w["cpu"]) for w in result["workers"])


def peak(result: dict, kind: str) -> tuple[float, float]:
    """(client, largest worker) peak RSS in bytes over a configuration's rounds: kind 'hwm' (the process's own)
    or 'maxrss' (ru_maxrss)."""
    return result[f"client_{kind}"], result[f"worker_{kind}"]


def shown(result: dict, results: list[dict]) -> str:
    """The configuration's label, with its round when it ran more than once."""
    repeated = sum(r["label"] == result["label"] for r in results) > 1
    return f"{result['label']} #{result.get('round', 1)}" if repeated else result["label"]


def summary(results: list[dict]) -> dict[str, dict]:
    """Per configuration over its rounds: the best rate (its own row otherwise) and the highest peaks seen."""
    merged: dict[str, dict] = {}
    for r in (r for r in results if "error" not in r):
        best = merged.get(r["label"])
        if best is None or r["images"] / r["wall"] > best["images"] / best["wall"]:
            merged[r["label"]] = {**r, "workers": [dict(w) for w in r["workers"]]}
    for label, best in merged.items():
        rounds = [r for r in results if r["label"] == label and "error" not in r]
        for kind in ("hwm", "maxrss"):
            best[f"client_{kind}"] = max(r[f"client_{kind}"] for r in rounds)
            best[f"worker_{kind}"] = max(w[kind] for r in rounds for w in r["workers"])
    return merged


def print_table(results: list[dict], precision: str) -> None:
    print(f"\n{'':<16}{'':>8}{'decoded':>8}{'index':>7}{'wall':>8}{'':>7}{'cpu':>6}  {'client peak RSS':<16}"
          f"{'worker peak RSS MiB':<24}{'store':>7}")
    print(f"{'configuration':<16}{'images':>8}{'GiB':>8}{'s':>7}{'s':>8}{'img/s':>7}{'ms':>6}  {'own':>5} "
          f"{'ru_max':>7}   {'own':<11}{'ru_maxrss':<12}{'B/img':>7}  verified")
    for r in results:
        decoded = r["images"] * SIZE * SIZE * 3 / GIB
        label = shown(r, results)
        if "error" in r:
            print(f"{label:<16}{r['images']:>8}{decoded:>8.2f}  FAILED: {r['error']}")
            continue
        own = "/".join(mib(w["hwm"]) for w in r["workers"])
        maxrss = "/".join(mib(w["maxrss"]) for w in r["workers"])
        verified = "yes" if r["verified"] else "NO " + "; ".join(r["problems"])
        print(f"{label:<16}{r['images']:>8}{decoded:>8.2f}{r['index']:>7.1f}{r['wall']:>8.1f}"
              f"{r['images'] / r['wall']:>7.0f}{worker_cpu(r) / r['images'] * 1000:>6.1f}  {mib(r['client_hwm']):>5} "
              f"{mib(r['client_maxrss']):>7}   {own:<11}{maxrss:<12}{r['store_bytes'] / r['images']:>7.0f}  {verified}")
    print(f"index: the client's source read (list + index + fingerprint; npz: load); cpu: the workers' user + system "
          f"CPU ms per image; peak RSS 'own': VmHWM, 'ru_max': ru_maxrss (RUSAGE_SELF), which also counts the "
          f"parent's peak at spawn time; store: every file of the {precision} store on disk per image")


def print_ratios(results: list[dict], n: int, eight: int) -> None:
    by = summary(results)
    print("\npeak RSS at 8N / at N (target <= 1.2; own peak = VmHWM, ru_maxrss in brackets; the highest of the "
          "rounds):")
    for kind in ("imagefolder", "webdataset"):
        small, large = by.get(f"{kind} N"), by.get(f"{kind} 8N")
        if not (small and large):
            print(f"  {kind}: not measured")
            continue
        (client, worker), (client_ru, worker_ru) = ([a / b for a, b in zip(peak(large, k), peak(small, k), strict=True)]
                                                    for k in ("hwm", "maxrss"))
        verdict = "met" if max(client, worker) <= 1.2 else "NOT met"
        print(f"  {kind:<12} client {client:.2f} ({client_ru:.2f}), largest worker {worker:.2f} ({worker_ru:.2f}): "
              f"{verdict}")
    print("\nimages/s vs the in-memory npz at N (target >= 0.8; the best round of each):")
    npz = by.get("npz N")
    for kind in ("imagefolder", "webdataset"):
        lazy = by.get(f"{kind} N")
        if not (npz and lazy):
            print(f"  {kind}: not measured")
            continue
        ratio = (lazy["images"] / lazy["wall"]) / (npz["images"] / npz["wall"])
        bare = (lazy["images"] / (lazy["wall"] - lazy["index"])) / (npz["images"] / (npz["wall"] - npz["index"]))
        cpu = (worker_cpu(npz) / npz["images"]) / (worker_cpu(lazy) / lazy["images"])
        print(f"  {kind:<12} {ratio:.2f} ({'met' if ratio >= 0.8 else 'NOT met'}); without the index pass / npz load "
              f"{bare:.2f}; by the workers' CPU time per image {cpu:.2f}")
    decoded = eight * SIZE * SIZE * 3 / GIB
    above = ", above the 4 GiB the in-memory path accepts" if decoded > 4 else ", NOT above 4 GiB"
    print(f"\n8N runs ({eight} images, {decoded:.2f} GiB decoded{above}):")
    for kind in ("imagefolder", "webdataset"):
        r = next((x for x in results if x["label"] == f"{kind} 8N"), None)
        if r is None:
            print(f"  {kind}: not run")
        elif "error" in r:
            print(f"  {kind}: FAILED ({r['error']})")
        else:
            print(f"  {kind:<12} completed ({r['status']}), verified: {'yes' if r['verified'] else 'NO'} "
                  f"(verify_store {r['verify_seconds']:.0f} s)")


def print_costs(results: list[dict]) -> None:
    print("\nper training image, ms (generators: their own time in the workers, from the manifest; cpu: the workers' "
          "user and system CPU time over the whole generate)")
    print(f"{'configuration':<16}{'gaussian':>9}{'fgsm':>7}{'cpu user':>10}{'cpu sys':>9}{'client cpu':>12}")
    for r in results:
        if "error" in r:
            continue
        gaussian, fgsm = (r["gen_seconds"][v] / r["images"] * 1000 for v in ("gaussian", "fgsm"))
        user = sum(w["cpu"][0] for w in r["workers"]) / r["images"] * 1000
        system = sum(w["cpu"][1] for w in r["workers"]) / r["images"] * 1000
        print(f"{shown(r, results):<16}{gaussian:>9.3f}{fgsm:>7.3f}{user:>10.3f}{system:>9.3f}"
              f"{sum(r['client_cpu']) / r['images'] * 1000:>12.3f}")
    first = next((r for r in results if r.get("arrays")), None)
    if first:
        print(f"\nstore size per image, first shard of {first['label']} (HDF5 storage sizes):")
        for name, info in first["arrays"].items():
            if name.startswith("_"):
                continue
            variant = f", {info['per_variant']:.0f} B per variant" if info["per_variant"] else ""
            print(f"  {name:<10}{info['dtype']:>9} {str(info['shape']):<16}{info['per_image']:>8.0f} B/image{variant}")
        print(f"  shard file {first['arrays']['_file_per_image']:.0f} B/image; the whole store "
              f"{first['store_bytes'] / first['images']:.0f} B/image")
    rates = [f"{r['label']} {r['success']['fgsm']:.2f}" for r in results
             if "error" not in r and r["success"]["fgsm"] is not None]
    if rates:
        print("fgsm success rate (fooled / clean-correct): " + ", ".join(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=44000,
                        help="N, training images of the small set; 8N is the large one (44000: 8N is 4.03 GiB decoded)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/advpipe-scale"), help="sources, model, logs")
    parser.add_argument("--cluster", default="local:2", help="local:W, W worker processes of one thread")
    parser.add_argument("--precision", default="float16", choices=["float16", "float32", "uint8"])
    parser.add_argument("--per-shard", type=int, default=1000, help="images per WebDataset source shard")
    parser.add_argument("--shard-size", type=int, default=512, help="images per store shard")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=100, help="Adam steps of the source model (batch 64)")
    parser.add_argument("--statistics", action="store_true",
                        help="generation.statistics on (the library's default): five more model passes per image")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each N configuration (best rate kept)")
    parser.add_argument("--only", default="", help="comma-separated configurations to run, e.g. 'npz N,webdataset N'")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_config(json.loads(args.child))), flush=True)
        return

    from advpipe.pipeline.cluster import local_workers

    local_workers(args.cluster)  # a bad --cluster fails here, before any source is written
    n, eight = args.images, 8 * args.images
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    print(f"N = {n} ({n * SIZE * SIZE * 3 / GIB:.2f} GiB decoded), 8N = {eight} "
          f"({eight * SIZE * SIZE * 3 / GIB:.2f} GiB decoded), 64x64x3; work in {work}; "
          f"{shutil.disk_usage(work).free / GIB:.0f} GiB free there")
    sets = {n: write_set(work, n, args.seed, args.per_shard, True, os.cpu_count() or 1),
            eight: write_set(work, eight, args.seed, args.per_shard, False, os.cpu_count() or 1)}
    for count, root in sets.items():
        npz = root / "source.npz"
        sizes = f", npz {npz.stat().st_size / GIB:.2f} GiB" if npz.exists() else ""
        print(f"  set {count}: folder {tree_bytes(root / 'folder') / GIB:.2f} GiB, shards "
              f"{tree_bytes(root / 'wds') / GIB:.2f} GiB{sizes}")
    model = work / f"lenet-{SIZE}-{args.seed}-{args.train_steps}.pt"
    train_model(model, args.seed, args.train_steps)

    wanted = {label.strip() for label in args.only.split(",") if label.strip()}
    chosen = [c for c in configurations(work, sets, n, eight) if not wanted or c[0] in wanted]
    small, large = [c for c in chosen if c[2] == n], [c for c in chosen if c[2] != n]
    # rounds of the N configurations before and after the 8N ones: load from other processes on the machine
    # then falls on all of them alike, and the best rate of each is compared
    schedule = [(c, 1) for c in small] + [(c, 1) for c in large] + [(c, r) for r in range(2, args.rounds + 1)
                                                                     for c in small]
    results = []
    for (label, source, images), round_ in schedule:
        slug = label.replace(" ", "-")
        spec = {"label": label, "source": source, "images": images, "model": str(model),
                "store": str(work / f"store-{slug}"), "cache": str(work / f"cache-{slug}"),
                "log": str(work / "logs" / f"{slug}.log"), "cluster": args.cluster, "precision": args.precision,
                "shard_size": args.shard_size, "batch_size": args.batch_size, "statistics": args.statistics}
        shutil.rmtree(spec["store"], ignore_errors=True)
        shutil.rmtree(spec["cache"], ignore_errors=True)
        print(f"running {label} ({images} images, round {round_}) ...", flush=True)
        result = {**run_child(spec, work), "round": round_}
        shutil.rmtree(spec["store"], ignore_errors=True)  # the child deletes it too, unless it failed
        shutil.rmtree(spec["cache"], ignore_errors=True)
        results.append(result)
        if "error" in result:
            print(f"  FAILED: {result['error']}", flush=True)
        else:
            print(f"  {result['wall']:.1f} s (index {result['index']:.1f} s), {images / result['wall']:.0f} img/s, "
                  f"verified {result['verified']}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\ncluster {args.cluster} (threads_per_worker 1), variants gaussian sigma 0.05 + fgsm eps 0.03 (lenet "
          f"64x64x3), store shards of {args.shard_size}, batch {args.batch_size}, source shards of {args.per_shard}, "
          f"statistics {'on' if args.statistics else 'off'}")
    print_table(results, args.precision)
    print_ratios(results, n, eight)
    print_costs(results)


if __name__ == "__main__":
    main()
