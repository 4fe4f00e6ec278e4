"""The calibrater: only G learns, the paper's schedule, k-means quantisation, transfer, and a real gain on b2 digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    centroid_gradients,
    count_parameters,
    finetune_centroids,
    load_calibrater,
    quantize_uniform,
    quantize_weights,
    reestimate_batchnorm,
    save_calibrater,
    share_weights,
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


def as_paired_batch(items) -> Batch:
    """b2 rows with their clean twins, as a loader with pair_clean gives them."""
    x, x_clean, y, index, variant = (torch.stack(column) for column in zip(*items, strict=True))
    return Batch(x=x, y=y, variant=variant, index=index, x_clean=x_clean)


def test_quantised_main_model_is_quantised_in_setup_then_frozen(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    method = CalibraterMethod({"quantize_bits": 2, "variants": ["b2"]}, checkpoint=path,
                              variant_names=["clean", "b2"])
    assert method.sampler_config("adversarial", SamplerConfig(), []).pair_clean  # clean twins to fine-tune on
    data = TensorDataset(torch.rand(16, 1, 8, 8), torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)),
                         torch.arange(16), torch.ones(16, dtype=torch.long))
    model = build_model("lenet", 10, (1, 8, 8))
    fit(model, method, DataLoader(data, batch_size=8, collate_fn=as_paired_batch), optim=ADAM, progress=False)
    assert method.compression["finetune_steps"] == 2  # one pass over the two batches' clean twins
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            assert len(torch.unique(module.weight)) <= 4
    # G as the paper deploys it with a compressed f: 8 bits when training ends
    for module in method.generator.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            assert len(torch.unique(module.weight)) <= 256


def test_fine_tuned_centroids_keep_at_most_2_to_the_bits_values_and_learn() -> None:
    torch.manual_seed(0)
    model = build_model("lenet", 10, (1, 8, 8))
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    for bits in (2, 3):
        net = build_model("lenet", 10, (1, 8, 8))
        net.load_state_dict(model.state_dict())
        books = share_weights(net, bits)
        before = {name: book.module.weight.detach().clone() for name, book in books.items()}
        with torch.no_grad():
            loss_before = F.cross_entropy(net(x), y).item()
        steps = finetune_centroids(net, books, [(x, y)] * 5, lr=1e-3, epochs=2)
        assert steps == 10
        for name, book in books.items():
            weight = book.module.weight
            assert len(torch.unique(weight)) <= 2 ** bits
            assert not torch.equal(weight, before[name])  # the centroids moved
            # each weight still sits on its own centroid: the sharing pattern is the k-means one
            assert torch.equal(weight, book.centroids.float()[book.labels])
        with torch.no_grad():
            assert F.cross_entropy(net(x), y).item() < loss_before


def test_a_centroid_moves_by_the_sum_of_the_gradients_of_its_weights() -> None:
    """Han et al.'s eq. 3 on a 2x3 layer, by hand: loss = sum(w * g) has dL/dw = g."""
    labels = torch.tensor([[0, 1, 1], [2, 0, 1]])
    grads = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.25, 4.0]])
    # centroid 0: 0.5 + 0.25; centroid 1: -1 + 2 + 4; centroid 2: 3; centroid 3 holds no weight
    assert torch.equal(centroid_gradients(labels, grads, 4), torch.tensor([0.75, 5.0, 3.0, 0.0], dtype=torch.float64))

    class Probe(nn.Module):  # logits whose cross-entropy gradient w.r.t. the weight is known
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    probe = Probe()
    with torch.no_grad():
        probe.layer.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [3.0, 1.0, -1.0]]))
    books = share_weights(probe, 2)  # 3 distinct values: kept as they are, labels by value
    assert torch.equal(books["layer"].labels, torch.tensor([[1, 0, 0], [2, 1, 0]]))
    # x = (1, 0, 0), y = 0: logits (1, 3); dCE/dlogits = softmax - onehot = (p0 - 1, p1); dL/dW = outer(that, x)
    p = torch.softmax(torch.tensor([1.0, 3.0], dtype=torch.float64), 0)
    finetune_centroids(probe, books, [(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))], lr=1.0)
    # centroid -1 (label 0) holds w01, w02, w12: gradient 0; centroid 1 (label 1) holds w00 and w11: p0 - 1;
    # centroid 3 (label 2) holds w10: p1
    expected = torch.tensor([-1.0, 1.0 - (p[0].item() - 1), 3.0 - p[1].item()], dtype=torch.float64)
    assert torch.allclose(books["layer"].centroids, expected, atol=1e-6)
    assert torch.allclose(probe.layer.weight, expected.float()[books["layer"].labels])


def test_batchnorm_statistics_are_re_estimated_on_the_data() -> None:
    """After quantisation a conv -> bn net's running statistics become those of the data it is shown."""
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        net[0].bias.zero_()
    quantize_weights(net, 2)
    assert torch.equal(net[1].running_mean, torch.zeros(2)) and torch.equal(net[1].running_var, torch.ones(2))
    images = [torch.full((4, 1, 3, 3), 3.0), torch.full((4, 1, 3, 3), 5.0)]  # conv outputs: (3, 6) and (5, 10)
    net.eval()
    assert reestimate_batchnorm(net, images) == 1
    assert torch.allclose(net[1].running_mean, torch.tensor([4.0, 8.0]))
    # unbiased variances per batch, averaged: 0 within each constant batch
    assert torch.allclose(net[1].running_var, torch.zeros(2))
    assert net[1].momentum == 0.1 and not net.training  # left as it was
    assert reestimate_batchnorm(nn.Sequential(nn.Linear(2, 2)), []) == 0


def test_quantised_main_model_has_its_batchnorm_re_estimated_in_setup(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "mobilenet_v2_cifar")
    saved = torch.load(path, weights_only=True)["state_dict"]
    method = CalibraterMethod({"quantize_bits": 3, "variants": ["b2"], "finetune_epochs": 0}, checkpoint=path,
                              variant_names=["clean", "b2"])
    clean = 0.25 + 0.5 * torch.rand(16, 3, 8, 8)
    data = TensorDataset(torch.rand(16, 3, 8, 8), clean, torch.randint(0, 10, (16,)), torch.arange(16),
                         torch.ones(16, dtype=torch.long))
    model = build_model("mobilenet_v2_cifar", 10, (3, 8, 8))
    method.loader = DataLoader(data, batch_size=16, collate_fn=as_paired_batch)
    method.setup(model, torch.device("cpu"))
    first = model.features[0][1] if hasattr(model, "features") and isinstance(model.features, nn.Sequential) else \
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    name = next(n for n, m in model.named_modules() if m is first)
    assert not torch.equal(first.running_mean, saved[f"{name}.running_mean"])
    with torch.no_grad():
        out = conv(model.normalize(clean))  # the first batch norm reads the first convolution's output
    assert torch.allclose(first.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.running_var, out.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
    method.teardown(model)


def test_generator_weights_take_at_most_256_values_per_layer() -> None:
    torch.manual_seed(0)
    generator = Calibrater(3, 32, blocks=2)
    nn.init.normal_(generator.up[-1].weight, std=0.1)
    layers = {name: m for name, m in generator.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)}
    assert max(len(torch.unique(m.weight)) for m in layers.values()) > 256  # thousands of float32 values
    before = {name: m.weight.detach().clone() for name, m in layers.items()}
    counts = quantize_uniform(generator, 8)
    assert set(counts) == set(layers)
    for name, module in layers.items():
        assert len(torch.unique(module.weight)) <= 256
        step = (before[name].max() - before[name].min()) / 255
        assert (module.weight - before[name]).abs().max() <= step / 2 + 1e-6  # rounded to the nearest level


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
