"""`advpipe train` from a real generated digits store: results, resumption after SIGKILL, data parallel, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import digits_config

from advpipe.config import config_from_dict
from advpipe.errors import ConfigError, TrainingError
from advpipe.models import load_checkpoint
from advpipe.stores import open_store
from advpipe.trainers.evaluate import variant_accuracy
from advpipe.trainers.run import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
         "tensorboard": False}
VARIANTS = {"fgsm": {"eps": 0.15}, "bim": {"eps": 0.15, "eps_step": 0.03, "max_iter": 8}}


def store_config(root: Path, model: Path, **overrides: object) -> dict:
    raw = digits_config(root, variants=VARIANTS, limit=None, shard_size=256, checkpoint=model)
    raw["train"] = {**TRAIN, "runs_dir": str(root / "runs")}
    raw["methods"] = {"adversarial": {"ratio": 0.5}, "clean": {}}
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory, digits_model: Path) -> tuple[Path, dict]:
    """Every digits image (16x16) with FGSM and BIM against the shared source LeNet."""
    from advpipe.pipeline.job import generate

    root = tmp_path_factory.mktemp("train-store")
    raw = store_config(root, digits_model)
    generate(config_from_dict(raw), progress=False)
    return root, raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_adversarial_training_beats_clean_training_on_stored_attacks(digits_store: tuple[Path, dict]) -> None:
    root, raw = digits_store
    config = config_from_dict({**raw, "train": {**raw["train"], "epochs": 6}})
    store = open_store(config.store.path)
    results = {}
    for method in ("clean", "adversarial"):
        result = train(config, method, progress=False)
        assert result.status == "trained" and len(result.history) == 6
        model, meta = load_checkpoint(result.model_path)
        assert meta.training["method"] == method
        results[method] = variant_accuracy(model, store)
    clean, adversarial = results["clean"], results["adversarial"]
    # measured here: clean-trained 0.93 clean / 0.08 fgsm / 0.03 bim; adversarial 0.83 / 0.62 / 0.60
    assert clean["clean"] > 0.85 and adversarial["clean"] > 0.75  # robustness costs some clean accuracy
    assert adversarial["fgsm"] > clean["fgsm"] + 0.3
    assert adversarial["bim"] > clean["bim"] + 0.3
    history = [json.loads(line) for line in (root / "runs" / "test" / "adversarial" / "metrics.jsonl")
               .read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4, 5, 6]
    last = history[-1]
    assert 0.35 < last["sampler/adversarial_fraction"] < 0.65  # ratio 0.5 over 1437 draws
    expected = {"train_acc/clean", "train_acc/fgsm", "train_acc/bim", "images_per_s", "eval_acc", "loader_share"}
    assert expected <= set(last)
    assert 0 < last["data_wait_s"] < last["time_s"]
    assert last["sampler/clean"] + last["sampler/fgsm"] + last["sampler/bim"] == len(
        store.split("train"))
    # the same settings again: nothing to do
    assert train(config, "adversarial", progress=False).status == "up-to-date"


DROPOUT_ARCH = "test-dropout-lenet"
#: `advpipe train` with one more registry architecture: LeNet with dropout, so training draws from torch's RNG
DROPOUT_CLI = textwrap.dedent(f"""
    import sys
    from torch import nn
    from advpipe.cli import main
    from advpipe.models import registry
    from advpipe.models.lenet import LeNet

    class DropoutLeNet(LeNet):
        arch = "{DROPOUT_ARCH}"

        def __init__(self, num_classes, input_shape):
            super().__init__(num_classes, input_shape)
            self.head.insert(3, nn.Dropout(0.5))  # Flatten, F6, ReLU, here, output layer

    registry.BUILDERS[DropoutLeNet.arch] = DropoutLeNet
    sys.exit(main())
""")


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model file's weights, read without building its architecture (the dropout one is not registered here)."""
    payload = torch.load(path, weights_only=True)
    assert json.loads(payload["meta"])["arch"] == DROPOUT_ARCH
    return payload["state_dict"]


@pytest.mark.parametrize("kill_at", ["epoch-2-saved", "step-30-saved"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(digits_store: tuple[Path, dict], tmp_path: Path,
                                                          kill_at: str) -> None:
    """Train 3 epochs; kill -9 after a checkpoint; resume in a new process: the final weights are identical.

    The model has dropout and the batches are augmented, so the resumed run matches only if the
    checkpoint restores every random state (torch's global RNG for the dropout masks included).
    """
    _, raw = digits_store
    raw = {**raw, "train": {**raw["train"], "checkpoint_every": 10},
           "methods": {"dyn": {"method": "dynamic", "augment": True, "arch": DROPOUT_ARCH}},
           "sampler": {"ratio": [0.2, 0.8], "weights": {"fgsm": [0.5, 1.0], "bim": [0.5, 2.0]}, "adaptive": True,
                       "redraw": "batch", "seed": 1}}
    config = write_config(tmp_path / "config.yaml", raw)
    launcher = tmp_path / "advpipe_dropout.py"
    launcher.write_text(DROPOUT_CLI)
    command = [sys.executable, str(launcher), "train", str(config), "--method", "dyn", "--device", "cpu"]
    whole = subprocess.run([*command, "--out", str(tmp_path / "whole")], env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.run([*command, "--out", str(tmp_path / "cut")], env={**ENV, "ADVPIPE_FAULT": kill_at},
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "running"
    refused = subprocess.run([*command, "--out", str(tmp_path / "cut")], env=ENV, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run([*command, "--out", str(tmp_path / "cut"), "--resume"], env=ENV, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    first, second = saved_weights(tmp_path / "whole" / "model.pt"), saved_weights(tmp_path / "cut" / "model.pt")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in lines("whole")] == [r["loss"] for r in lines("cut")]
    assert lines("cut")[-1]["adaptive_errors"] == lines("whole")[-1]["adaptive_errors"]


DDP = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from advpipe.config import OptimConfig, SamplerConfig
    from advpipe.models import build_model
    from advpipe.sampler import open_loader
    from advpipe.trainers import distributed
    from advpipe.trainers.baselines import CleanMethod, cross_entropy_step

    class Recording(CleanMethod):
        seen = []
        def training_step(self, model, batch, ctx):
            self.seen += batch.index.tolist()
            return cross_entropy_step(model, batch)

    distributed.init_from_environment(torch.device("cpu"))
    store, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(dist.get_rank())  # different initial weights: rank 0's must be broadcast
    model = build_model("lenet", 10, (1, 16, 16))
    loader = open_loader(store, "train", SamplerConfig(ratio=(0.5, 0.5), seed=2), batch_size=32)
    method = Recording()
    from advpipe.trainers.loop import fit
    fit(model, method, loader, optim=OptimConfig(epochs=1, lr=0.01), progress=False)
    torch.save(model.state_dict(), f"{out}/rank{dist.get_rank()}.pt")
    json.dump({"seen": method.seen, "batches": len(loader)}, open(f"{out}/rank{dist.get_rank()}.json", "w"))
    distributed.shutdown()
""")


@pytest.mark.slow
def test_torchrun_two_ranks_train_identical_weights_reading_every_image_once(digits_store: tuple[Path, dict],
                                                                             tmp_path: Path) -> None:
    _, raw = digits_store
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script),
                             raw["store"]["path"], str(tmp_path)], env=ENV, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["batches"] == seen[1]["batches"]
    indices = seen[0]["seen"] + seen[1]["seen"]
    count = len(open_store(raw["store"]["path"]).split("train"))
    assert sorted(set(indices)) == list(range(count))
    assert len(indices) == count + count % 2  # the map-style split pads one image when the count is odd


DDP_MEAN = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from advpipe.batch import Batch
    from advpipe.config import OptimConfig
    from advpipe.models import build_model
    from advpipe.trainers import distributed
    from advpipe.trainers.baselines import CleanMethod
    from advpipe.trainers.loop import fit

    distributed.init_from_environment(torch.device("cpu"))
    data, out = torch.load(sys.argv[1], weights_only=True), sys.argv[2]
    rank = dist.get_rank()
    torch.manual_seed(1000 + rank)  # not the reference's seed: rank 0's weights must be broadcast
    model = build_model("lenet", 10, (1, 8, 8))
    mine = slice(rank * data["half"], (rank + 1) * data["half"])
    batches = [Batch.clean(x[mine], y[mine], torch.arange(len(y))[mine]) for x, y in zip(data["x"], data["y"])]
    fit(model, CleanMethod(), batches, optim=OptimConfig(**data["optim"]), progress=False)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    distributed.shutdown()
""")


@pytest.mark.slow
def test_torchrun_two_ranks_step_as_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    """Data parallelism must average the ranks' gradients: summing them keeps the ranks identical, so
    only a comparison with a one-process run on both halves together catches it.

    Plain SGD (Adam would scale a doubled gradient away), three steps of 2 x 4 images of 8x8.
    """
    from advpipe.batch import Batch
    from advpipe.config import OptimConfig
    from advpipe.models import build_model
    from advpipe.trainers.baselines import CleanMethod
    from advpipe.trainers.loop import fit

    half, steps = 4, 3
    generator = torch.Generator().manual_seed(7)
    optim = {"epochs": 1, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0,
             "schedule": "constant"}
    data = {"x": [torch.rand(2 * half, 1, 8, 8, generator=generator) for _ in range(steps)],
            "y": [torch.randint(0, 10, (2 * half,), generator=generator) for _ in range(steps)],
            "half": half, "optim": optim}
    torch.save(data, tmp_path / "data.pt")
    script = tmp_path / "ddp_mean.py"
    script.write_text(DDP_MEAN)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "data.pt"),
                             str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

    torch.manual_seed(1000)  # rank 0's initial weights
    model = build_model("lenet", 10, (1, 8, 8))
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    whole = [Batch.clean(x, y, torch.arange(len(y))) for x, y in zip(data["x"], data["y"], strict=True)]
    fit(model, CleanMethod(), whole, optim=OptimConfig(**optim), progress=False)
    expected = model.state_dict()
    assert max((expected[name] - initial[name]).abs().max().item() for name in initial) > 1e-2  # it did train
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, tensor in expected.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")


def test_bf16_autocast_runs_on_the_cpu(digits_store: tuple[Path, dict]) -> None:
    from advpipe.config import OptimConfig, SamplerConfig
    from advpipe.models import build_model
    from advpipe.sampler import open_loader
    from advpipe.trainers.baselines import CleanMethod
    from advpipe.trainers.loop import fit

    dtypes = []

    class Probe(CleanMethod):
        def training_step(self, model, batch, ctx):
            loss, metrics = super().training_step(model, batch, ctx)
            dtypes.append((torch.is_autocast_enabled("cpu"), model(batch.x).dtype))
            return loss, metrics

    _, raw = digits_store
    loader = open_loader(raw["store"]["path"], "test", SamplerConfig(ratio=(0.0, 0.0)), batch_size=64)
    history = fit(build_model("lenet", 10, (1, 16, 16)), Probe(), loader, optim=OptimConfig(epochs=1, lr=0.01),
                  amp=True, progress=False)
    assert dtypes and all(enabled and dtype == torch.bfloat16 for enabled, dtype in dtypes)
    assert history[0]["loss"] == history[0]["loss"]  # finite: not NaN


def test_bad_input_is_refused_before_training(digits_store: tuple[Path, dict], tmp_path: Path) -> None:
    root, raw = digits_store
    with pytest.raises(ConfigError, match="unknown training method 'adverserial'"):
        train(config_from_dict(raw), "adverserial", out=tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match=r"methods\.adversarial: method 'adversarial': unknown parameter 'ratoi'"):
        config_from_dict({**raw, "methods": {"adversarial": {"ratoi": 0.5}}})
    first = config_from_dict({**raw, "train": {**raw["train"], "epochs": 1}})
    train(first, "clean", out=tmp_path / "run", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    other = config_from_dict({**raw, "train": {**raw["train"], "epochs": 1, "lr": 0.01}})
    for resume in (False, True):
        with pytest.raises(TrainingError, match="holds a run made with other settings.*train"):
            train(other, "clean", out=tmp_path / "run", resume=resume, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(TrainingError, match="not a run directory"):
        train(first, "clean", out=tmp_path / "mine", progress=False)


def test_a_methods_own_networks_start_from_the_runs_seed(digits_store: tuple[Path, dict], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The detector's head is built by the method: two runs of one seed give it the same start, another seed not."""
    import advpipe.trainers.run as run

    heads = []

    def recorded(*args, **kwargs):
        method = build_method(*args, **kwargs)
        heads.append(torch.cat([p.detach().flatten() for p in method.head.parameters()]))
        raise StopTraining

    class StopTraining(Exception):
        pass

    from advpipe.trainers.registry import build_method

    monkeypatch.setattr(run, "build_method", recorded)
    root, raw = digits_store
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        config = config_from_dict({**raw, "seed": seed, "methods": {"detector": {"ratio": 0.5}}})
        with pytest.raises(StopTraining):
            train(config, "detector", out=tmp_path / out, progress=False)
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
