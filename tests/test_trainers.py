"""The shared training loop on synthetic data, and source-model training on digits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from advpipe.batch import Batch
from advpipe.config import Config, OptimConfig, config_from_dict
from advpipe.models import check_compatible, load_checkpoint
from advpipe.trainers.baselines import CleanMethod
from advpipe.trainers.clean import train_source
from advpipe.trainers.loop import Method, StepContext, TrainingError, evaluate, fit

# A short schedule that still learns digits well (suggested configs/digits.yaml values, fewer epochs).
DIGITS_OPTIM = {"optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "batch_size": 32, "epochs": 5}


def separable(n: int = 256, seed: int = 0) -> TensorDataset:
    """4x4 grey images: class 1 iff the left half is brighter than the right half."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=generator)
    y = (x[..., :2].mean(dim=(1, 2, 3)) > x[..., 2:].mean(dim=(1, 2, 3))).long()
    return TensorDataset(x, y, torch.arange(n))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def as_batch(items: list[tuple[Tensor, Tensor, Tensor]]) -> Batch:
    x, y, index = (torch.stack(column) for column in zip(*items, strict=True))
    return Batch.clean(x, y, index)


def loader(dataset: TensorDataset, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(0),
                      collate_fn=as_batch)


def test_loop_reduces_loss_on_a_separable_problem() -> None:
    history = fit(tiny_model(), CleanMethod(), loader(separable()),
                  optim=OptimConfig(epochs=8, lr=0.5), eval_loader=loader(separable(seed=1), False),
                  progress=False)
    assert len(history) == 8
    assert {"epoch", "loss", "train_acc", "eval_acc", "time_s", "lr"} <= set(history[0])
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["eval_acc"] >= 0.9
    assert history[-1]["lr"] < 0.05  # cosine ran down


class Recorder(Method):
    """Logs every hook call and checks what each hook can see."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.extras: list[Tensor] = []

    def setup(self, model: nn.Module, device: torch.device) -> None:
        self.calls.append("setup")

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.calls.append(f"epoch_start {epoch}")

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        self.extras.append(batch.index)
        assert model.training and ctx.optimizer is not None
        return F.cross_entropy(model(batch.x), batch.y), {"custom": 2.0}

    def after_backward(self, model: nn.Module, batch: Batch, ctx: StepContext) -> None:
        assert all(p.grad is not None for p in model.parameters())
        self.calls.append("after_backward")

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict) -> None:
        record["extra"] = epoch
        self.calls.append(f"epoch_end {epoch}")

    def teardown(self, model: nn.Module) -> None:
        self.calls.append("teardown")


def test_hooks_run_in_order_and_extras_pass_through() -> None:
    method = Recorder()
    data = separable(64)
    history = fit(tiny_model(), method, loader(data, shuffle=False),
                  optim=OptimConfig(epochs=2, schedule="constant"), progress=False)
    steps = ["after_backward"] * 2
    assert method.calls == ["setup", "epoch_start 0", *steps, "epoch_end 0",
                            "epoch_start 1", *steps, "epoch_end 1", "teardown"]
    assert torch.equal(torch.cat(method.extras[:2]), torch.arange(64))
    assert history[1]["train_custom"] == 2.0 and history[1]["extra"] == 1
    assert history[1]["eval_acc"] is None and history[1]["lr"] == 0.05  # constant schedule


class Diverging(CleanMethod):
    torn_down = False

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        loss, metrics = super().training_step(model, batch, ctx)
        return loss * math.inf, metrics

    def teardown(self, model: nn.Module) -> None:
        self.torn_down = True


def test_non_finite_loss_stops_training_and_tears_down() -> None:
    method = Diverging()
    with pytest.raises(TrainingError, match="lower the learning rate"):
        fit(tiny_model(), method, loader(separable()), optim=OptimConfig(epochs=1), progress=False)
    assert method.torn_down


def test_loader_without_length_steps_the_schedule_per_epoch() -> None:
    data = separable(64)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
            return iter(zip(*data.tensors, strict=True))

    history = fit(tiny_model(), CleanMethod(), DataLoader(Stream(), batch_size=16, collate_fn=as_batch),
                  optim=OptimConfig(epochs=2, optimizer="adam", lr=0.01), progress=False)
    assert history[0]["lr"] == pytest.approx(0.005) and history[1]["lr"] == pytest.approx(0.0)


def test_evaluate_restores_training_mode_and_refuses_empty_loaders() -> None:
    model = tiny_model().train()
    with torch.no_grad():  # a model that always answers class 1 scores the share of class 1
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0]))
    data = separable()
    accuracy = evaluate(model, loader(data, False))
    assert accuracy == pytest.approx(data.tensors[1].float().mean().item()) and model.training
    with pytest.raises(TrainingError, match="no batches"):
        evaluate(model, [])


def digits_config(tmp_path: Path, **optim: object) -> Config:
    return config_from_dict({
        "seed": 3, "device": "cpu",
        "source": {"kind": "digits", "image_size": 16},
        "model": {"arch": "lenet", "checkpoint": str(tmp_path / "source.pt")},
        "train_source": {**DIGITS_OPTIM, **optim},
    })


def test_train_source_on_digits_writes_a_good_checkpoint(tmp_path: Path, one_thread: None) -> None:
    path, metrics = train_source(digits_config(tmp_path), progress=False)
    assert path == tmp_path / "source.pt"
    assert metrics["test_acc"] >= 0.90 and len(metrics["history"]) == 5
    model, meta = load_checkpoint(path, arch="lenet")
    assert meta.input_shape == (1, 16, 16) and meta.num_classes == 10
    check_compatible(meta, 10, (16, 16, 1))
    training = meta.training
    assert training["test_accuracy"] == metrics["test_acc"] and training["epochs"] == 5
    assert training["seed"] == 3 and set(training["dataset"]) == {"train", "test"}


def test_train_source_is_deterministic(tmp_path: Path, one_thread: None) -> None:
    _, first = load_checkpoint(train_source(digits_config(tmp_path / "a", epochs=1), progress=False)[0])
    _, second = load_checkpoint(train_source(digits_config(tmp_path / "b", epochs=1), progress=False)[0])
    assert first.fingerprint == second.fingerprint


class IndexRecorder(CleanMethod):
    """Clean training that also records which images and variants each batch held."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.variants: list[int] = []

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(batch, Batch) and batch.x.dtype == torch.float32 and batch.x.shape[1:] == (3, 8, 8)
        self.indices += batch.index.tolist()
        self.variants += batch.variant.tolist()
        return super().training_step(model, batch, ctx)


@pytest.mark.parametrize("kind", ["map-style", "streaming", "source"])
def test_loop_trains_an_epoch_from_each_loader(tmp_path: Path, kind: str) -> None:
    """The map-style and streaming store loaders and the plain source loader all feed the same loop."""
    from conftest import make_arrays, write_test_store

    from advpipe.config import SamplerConfig
    from advpipe.datasets import SourceSplit
    from advpipe.sampler import make_loader
    from advpipe.sampler.streaming import make_stream_loader
    from advpipe.trainers.clean import split_loader

    policy = SamplerConfig(ratio=(0.5, 0.5), seed=1, batch_size=16)
    if kind == "map-style":
        write_test_store(tmp_path / "s", count=70)
        data = make_loader(tmp_path / "s", "train", policy)
    elif kind == "streaming":
        write_test_store(tmp_path / "s", backend="webdataset", count=70)
        data = make_stream_loader(tmp_path / "s", "train", policy, batch_size=16)
    else:
        arrays = make_arrays(70)
        split = SourceSplit.create("npz", "train", arrays.images.transpose(0, 2, 3, 1), arrays.labels,
                                   [str(i) for i in range(10)])
        data = split_loader(split, 16, shuffle=True)
    method = IndexRecorder()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    history = fit(model, method, data, optim=OptimConfig(epochs=1, lr=0.01), progress=False)
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    assert sorted(method.indices) == list(range(70))  # every image of the split exactly once
    adversarial = sum(v > 0 for v in method.variants)
    assert (adversarial > 10) if kind != "source" else adversarial == 0
