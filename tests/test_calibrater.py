"""The calibrater: only G learns, the paper's schedule, k-means quantisation, transfer, and a real gain on b2 digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, make_arrays, saved_model, write_test_store
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advpipe.batch import Batch
from advpipe.config import OptimConfig, SamplerConfig, SourceConfig
from advpipe.datasets import load_source
from advpipe.errors import ConfigError, ModelError, StoreError
from advpipe.models import build_model, load_checkpoint, model_fingerprint
from advpipe.pipeline.generators.shift import B2Params, ScenarioB2Generator
from advpipe.sampler.mapstyle import make_loader
from advpipe.stores import build_store
from advpipe.trainers.calibrater import (
    Calibrater,
    CalibraterMethod,
    calibrate,
    count_parameters,
    load_calibrater,
    quantize_weights,
    save_calibrater,
)
from advpipe.trainers.loop import evaluate, fit
from advpipe.trainers.registry import MethodContext, build_method

ADAM = OptimConfig(epochs=2, optimizer="adam", lr=1e-3)


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here on one thread."""


checkpoint = saved_model


def as_batch(items) -> Batch:
    x, y, index, variant = (torch.stack(column) for column in zip(*items, strict=True))
    return Batch(x=x, y=y, variant=variant, index=index)


def test_only_G_changes_and_the_main_model_stays_bit_identical(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "mobilenet_v2_cifar")  # batch norm: train mode would move f's statistics
    saved = torch.load(path, weights_only=True)["state_dict"]
    store = tmp_path / "store"
    write_test_store(store, count=48)
    loader = make_loader(store, "train", SamplerConfig(ratio=0.5, batch_size=16, seed=0))
    method = CalibraterMethod({"variants": ["noise"], "lr": 1e-3}, checkpoint=path, variant_names=loader.variant_names)
    generator_before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    model = build_model("mobilenet_v2_cifar", 10, (3, 8, 8))  # fresh: setup makes it f from the checkpoint

    history = fit(model, method, loader, optim=ADAM, progress=False)

    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved) and state.keys() == saved.keys()
    assert any(not torch.equal(v, generator_before[k]) for k, v in method.generator.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # teardown unfroze f again
    for record in history:
        assert 0.0 < record["train_rows"] < 1.0  # clean rows were in the batches and skipped
        assert record["calibrater_ratio"] == pytest.approx(
            count_parameters(method.generator) / count_parameters(model))


def test_batches_without_the_chosen_variant_leave_G_untouched(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    method = CalibraterMethod({"variants": ["b1"]}, checkpoint=path, variant_names=["clean", "b1", "b2"])
    before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    x = torch.rand(32, 1, 8, 8)
    data = TensorDataset(x, torch.randint(0, 10, (32,)), torch.arange(32), torch.tensor([0, 2] * 16))
    history = fit(build_model("lenet", 10, (1, 8, 8)), method, DataLoader(data, batch_size=8, collate_fn=as_batch),
                  optim=ADAM, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in method.generator.state_dict().items())
    assert history[-1]["train_rows"] == 0.0


def test_generator_is_about_a_tenth_of_the_main_model_and_starts_as_the_identity(tmp_path: Path) -> None:
    for arch, shape in (("lenet", (1, 8, 8)), ("mobilenet_v2_cifar", (3, 8, 8))):
        path = checkpoint(tmp_path, arch, shape=shape)
        main = build_model(arch, 10, shape)
        method = CalibraterMethod(checkpoint=path, variant_names=["clean", "b2"])
        assert method.ratio == pytest.approx(count_parameters(method.generator) / count_parameters(main))
        assert 0.075 <= method.ratio <= 0.125, (arch, method.ratio)
        x = torch.rand(2, *shape)
        assert torch.equal(method.generator.calibrate(x), x)
    wide = CalibraterMethod({"size_ratio": 0.3}, checkpoint=path, variant_names=["clean", "b2"])
    assert 0.25 <= wide.ratio <= 0.35


def test_paper_learning_rate_schedule(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    method = CalibraterMethod(checkpoint=path, variant_names=["clean", "b2"])
    assert [method.lr_at(epoch, 200) for epoch in (0, 49, 50, 99, 100, 149, 150, 199)] == pytest.approx(
        [2e-4, 2e-4, 1e-4, 1e-4, 5e-5, 5e-5, 2e-5, 2e-5])
    data = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.arange(16),
                         torch.ones(16, dtype=torch.long))
    fast = CalibraterMethod({"lr": 1e-3}, checkpoint=path, variant_names=["clean", "b2"])
    history = fit(build_model("lenet", 10, (1, 8, 8)), fast, DataLoader(data, batch_size=8, collate_fn=as_batch),
                  optim=OptimConfig(epochs=4, optimizer="sgd", lr=0.5), progress=False)
    assert [r["calibrater_lr"] for r in history] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1e-4])


def test_quantisation_keeps_at_most_2_to_the_bits_values_per_layer() -> None:
    torch.manual_seed(0)
    for bits in (2, 3):
        model = build_model("caffe_quick", 10, (3, 16, 16))
        before = {name: m.weight.detach().clone() for name, m in model.named_modules()
                  if isinstance(m, nn.Conv2d | nn.Linear)}
        counts = quantize_weights(model, bits)
        assert set(counts) == set(before) and len(before) == 5
        for name, module in model.named_modules():
            if name in before:
                values = torch.unique(module.weight)
                assert len(values) == 2 ** bits == counts[name]  # thousands of weights -> exactly 2**bits
                assert not torch.equal(module.weight, before[name])


def test_quantisation_finds_the_clusters_of_a_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(50, 40)
    centres = torch.tensor([-0.6, -0.1, 0.2, 0.7])
    with torch.no_grad():
        layer.weight.copy_(centres[torch.randint(0, 4, (40, 50))] + 0.01 * torch.randn(40, 50))
    original = layer.weight.detach().clone()
    quantize_weights(layer, 2)
    assert len(torch.unique(layer.weight)) == 4
    assert (layer.weight - original).abs().max() < 0.05  # each weight moved to its own cluster's centre
    assert torch.allclose(torch.unique(layer.weight), centres, atol=0.01)


def test_quantised_main_model_is_quantised_in_setup_then_frozen(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    method = CalibraterMethod({"quantize_bits": 2, "variants": ["b2"]}, checkpoint=path,
                              variant_names=["clean", "b2"])
    data = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.arange(16),
                         torch.ones(16, dtype=torch.long))
    model = build_model("lenet", 10, (1, 8, 8))
    fit(model, method, DataLoader(data, batch_size=8, collate_fn=as_batch), optim=ADAM, progress=False)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            assert len(torch.unique(module.weight)) <= 4


def shifted_digits(split: str, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits 16x16 through the project's b2 generator (rotation <= 20 degrees, jitter 2, 2, 2)."""
    source = load_source(SourceConfig(kind="digits", image_size=16), split)
    x = torch.from_numpy(source.images.transpose(0, 3, 1, 2).copy()).float() / 255
    y = torch.from_numpy(np.array(source.labels, dtype=np.int64))
    seeds = np.arange(len(y), dtype=np.uint64) + np.uint64(offset)
    return ScenarioB2Generator(B2Params(), None, backend="native").generate(x, y, seeds), y


def b2_loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool) -> DataLoader:
    data = TensorDataset(x, y, torch.arange(len(y)), torch.ones(len(y), dtype=torch.long))
    return DataLoader(data, batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(0),
                      collate_fn=as_batch)


def test_calibrater_raises_the_frozen_models_accuracy_on_b2_digits(digits_model: Path, tmp_path: Path) -> None:
    train_x, train_y = shifted_digits("train", 0)
    test_x, test_y = shifted_digits("test", 10 ** 6)
    model, _ = load_checkpoint(digits_model)
    before = evaluate(model, b2_loader(test_x, test_y, False))
    assert before < 0.8  # b2 really hurts a model trained on clean digits (measured: 62%)

    method = CalibraterMethod({"lr": 3e-3, "schedule": "constant"}, checkpoint=digits_model,
                              variant_names=["clean", "b2"])
    history = fit(model, method, b2_loader(train_x, train_y, True), optim=ADAM,
                  eval_loader=b2_loader(test_x, test_y, False), progress=False)
    after = history[-1]["eval_acc"]
    assert after >= before + 0.05  # measured: 62% -> 72%
    assert evaluate(model, b2_loader(test_x, test_y, False)) == before  # f itself is unchanged

    # The trained calibrater saved, reloaded and put in front of f gives the same accuracy.
    save_calibrater(tmp_path / "g.pt", method.generator, {"main": "digits lenet"})
    reloaded = load_calibrater(tmp_path / "g.pt")
    assert evaluate(calibrate(model, reloaded), b2_loader(test_x, test_y, False)) == pytest.approx(after)


def test_a_calibrater_wraps_another_main_model(tmp_path: Path) -> None:
    generator = Calibrater(3, 8, blocks=1)
    nn.init.normal_(generator.up[-1].weight, std=0.1)  # a non-identity calibrater
    other = build_model("caffe_quick", 4, (3, 12, 12)).eval()  # another arch, size and class count
    x = torch.rand(5, 3, 12, 12)
    with torch.no_grad():
        wrapped = calibrate(other, generator)(x)
        assert torch.equal(wrapped, other(x * (1 + torch.tanh(generator(x)))))
        assert not torch.equal(wrapped, other(x))
    with pytest.raises(ModelError, match="3-channel images but the model takes 1"):
        calibrate(build_model("lenet", 10, (1, 12, 12)), generator)


def test_built_from_the_config_it_draws_only_the_b2_rows_of_a_store(tmp_path: Path) -> None:
    """The registry path: `methods: {calibrater: {...}}` -> a method whose sampler feeds it b2 images only."""
    from advpipe.config import MethodConfig

    store = tmp_path / "store"
    splits = {}
    for split, seed in (("train", 0), ("test", 1)):
        arrays = make_arrays(40, shape=(1, 8, 8), seed=seed)
        arrays.variants = {"fgsm": arrays.variants["noise"], "b2": arrays.variants["tiny"]}
        splits[split] = arrays
    build_store(store, splits, class_names=CLASSES, shard_size=16, progress=False,
                variant_params={"b2": {"generator": "b2", "kind": "shift"}})
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    context = MethodContext(variant_names=["clean", "fgsm", "b2"], variant_kinds={"fgsm": "attack", "b2": "shift"},
                            checkpoint=path, arch="lenet", num_classes=10, input_shape=(1, 8, 8))
    method = build_method("calibrater", MethodConfig.model_validate({"merge": "additive", "lr": 1e-3}), context)
    assert isinstance(method, CalibraterMethod) and method.generator.merge == "additive"
    sampler = method.sampler_config(method.default_data, SamplerConfig(batch_size=8), ["fgsm"])
    loader = make_loader(store, "train", sampler)
    assert loader.variant_names == context.variant_names
    history = fit(build_model("lenet", 10, (1, 8, 8)), method, loader, optim=ADAM, progress=False)
    assert history[-1]["train_rows"] == 1.0  # every row drawn was b2
    assert "train_acc/b2" in history[-1] and "train_acc/fgsm" not in history[-1]


# ------------------------------------------------------------------------------------------- bad input


def test_store_without_the_variant_is_refused(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    with pytest.raises(StoreError, match=r"variant\(s\) b2, which the store does not hold \(it has: clean, fgsm"):
        CalibraterMethod(checkpoint=path, variant_names=["clean", "fgsm", "b1"])


def test_mismatched_checkpoint_and_bad_parameters_are_refused(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    names = ["clean", "b2"]
    with pytest.raises(ModelError, match="holds a 'lenet' model but 'caffe_quick' is expected"):
        CalibraterMethod(checkpoint=path, variant_names=names, arch="caffe_quick")
    with pytest.raises(ModelError, match="10 classes but the data/model has 3"):
        CalibraterMethod(checkpoint=path, variant_names=names, num_classes=3)
    method = CalibraterMethod(checkpoint=path, variant_names=names)
    other = build_model("caffe_quick", 10, (1, 8, 8))
    before = model_fingerprint(other)
    with pytest.raises(ModelError, match="holds a 'lenet' model but the trained model is 'caffe_quick'"):
        fit(other, method, [], optim=ADAM, progress=False)
    assert model_fingerprint(other) == before
    with pytest.raises(ConfigError, match="method 'calibrater': unknown parameter 'merg'"):
        CalibraterMethod({"merg": "additive"}, checkpoint=path, variant_names=names)
    with pytest.raises(ConfigError, match="'merge'"):
        CalibraterMethod({"merge": "divide"}, checkpoint=path, variant_names=names)
    with pytest.raises(ConfigError, match="needs the main model f"):
        CalibraterMethod(variant_names=names)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a calibrater file"):
        load_calibrater(tmp_path / "junk.pt")
