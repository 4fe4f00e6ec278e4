"""Model registry, feature maps, in-model normalisation and checkpoints (tiny batches, CPU)."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from advpipe.errors import ModelError
from advpipe.models import (
    ARCHITECTURES,
    CHECKPOINT_FORMAT,
    SourceModel,
    build_model,
    check_compatible,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    state_dict_fingerprint,
)

CLASSES = [f"c{i}" for i in range(10)]

CASES = [
    ("lenet", (1, 8, 8)),
    ("lenet", (1, 16, 16)),
    ("lenet", (1, 28, 28)),
    ("lenet", (3, 32, 32)),
    ("caffe_quick", (3, 32, 32)),
    ("caffe_lenet", (1, 28, 28)),
    ("caffe_lenet", (1, 16, 16)),
    ("caffe_lenet", (3, 32, 32)),
    ("cifar_resnet18", (3, 32, 32)),
    ("cifar_resnet34", (3, 32, 32)),
    ("mobilenet_v2_cifar", (3, 32, 32)),
    ("vgg16_cifar", (3, 32, 32)),
    ("torchvision:resnet18", (3, 32, 32)),
    ("torchvision:resnet18", (1, 32, 32)),
    ("torchvision:mobilenet_v3_small", (3, 32, 32)),
]


@pytest.fixture
def lenet() -> SourceModel:
    torch.manual_seed(0)
    return build_model("lenet", 10, (1, 16, 16)).eval()


@pytest.fixture
def saved(tmp_path: Path, lenet: SourceModel) -> Path:
    path = tmp_path / "model.pt"
    save_checkpoint(path, lenet, CLASSES, {"dataset": "abc", "accuracy": 0.9, "epochs": 1})
    return path


def test_registry_lists_the_builtin_architectures() -> None:
    weight_map_skeletons = {"wm_cnn_conv", "wm_cnn_smoothing", "wm_cnn_unsharp"} | {
        f"wm_{family}_{variant}" for family in ("resnet", "densenet")
        for variant in ("conv", "smoothing", "unsharp", "smoothing_alt", "unsharp_alt")}
    assert set(ARCHITECTURES) == {"lenet", "cifar_resnet18", "cifar_resnet34", "mobilenet_v2_cifar",
                                  "vgg16_cifar", "caffe_quick", "caffe_lenet"} | weight_map_skeletons


@pytest.mark.parametrize(("arch", "shape"), CASES, ids=[f"{a}-{s[0]}x{s[1]}" for a, s in CASES])
def test_every_architecture_gives_logits_and_feature_maps(arch: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 7, shape)
    assert isinstance(model, SourceModel)
    assert (model.arch, model.num_classes, model.input_shape) == (arch, 7, shape)
    x = torch.rand(2, *shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()  # attacks need gradients w.r.t. the [0, 1] input
    assert x.grad is not None and x.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        maps = model.features(x)
        both_maps, both_logits = model.forward_with_features(x)
        assert torch.allclose(both_logits, model(x), atol=1e-5)
    assert 1 <= len(maps) <= 5
    assert all(m.dim() == 4 and m.shape[0] == 2 for m in maps)
    assert [m.shape for m in maps] == [m.shape for m in both_maps]


def test_builtin_models_have_three_to_five_levels() -> None:
    for arch in ARCHITECTURES:
        shape = (1, 16, 16) if arch == "lenet" else (3, 32, 32)
        with torch.no_grad():
            maps = build_model(arch, 10, shape).eval().features(torch.rand(1, *shape))
        assert 3 <= len(maps) <= 5, arch
        # shallow -> deep: spatial size never grows
        assert all(a.shape[-1] >= b.shape[-1] for a, b in zip(maps, maps[1:], strict=False)), arch


def test_caffe_lenet_is_caffes_mnist_lenet_with_the_bang_papers_dropout() -> None:
    """conv1 20*1*5*5+20, conv2 50*20*5*5+50, fc1 800*500+500, fc2 500*10+10 = 431,080 parameters."""
    model = build_model("caffe_lenet", 10, (1, 28, 28))
    assert sum(p.numel() for p in model.parameters()) == 520 + 25_050 + 400_500 + 5_010 == 431_080
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 20, (5, 5), (0, 0)), (20, 50, (5, 5), (0, 0))]
    assert [(f.in_features, f.out_features) for f in linears] == [(800, 500), (500, 10)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    x = torch.rand(4, 1, 28, 28)
    assert [tuple(m.shape[1:]) for m in model.features(x)] == [(20, 24, 24), (50, 8, 8), (500, 1, 1)]
    torch.manual_seed(0)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout is active in training
    model.eval()
    assert torch.equal(model(x), model(x))
    # Caffe scales pixels to [0, 1] and subtracts no mean: the model normalises nothing
    assert torch.equal(model.normalize(x), x)
    with pytest.raises(ModelError, match="at least 16x16"):
        build_model("caffe_lenet", 10, (1, 12, 12))


def test_normalisation_happens_inside_the_model(lenet: SourceModel) -> None:
    """model(x) on [0, 1] equals the same weights without normalisation fed (x - 0.5) / 0.5."""
    x = torch.rand(4, 1, 16, 16)
    raw = copy.deepcopy(lenet)
    raw.input_mean.fill_(0.0)
    raw.input_std.fill_(1.0)
    with torch.no_grad():
        assert torch.allclose(lenet(x), raw((x - 0.5) / 0.5), atol=1e-5)
        assert not torch.allclose(lenet(x), raw(x), atol=1e-3)
    assert lenet.input_mean.shape == (1, 1, 1, 1)


def test_torchvision_models_use_imagenet_statistics() -> None:
    model = build_model("torchvision:resnet18", 3, (3, 32, 32))
    assert torch.allclose(model.input_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


@pytest.mark.parametrize(
    ("arch", "shape", "match"),
    [
        ("no_such_net", (3, 32, 32), "lenet, cifar_resnet18"),
        ("torchvision:no_such_net", (3, 32, 32), "resnet18"),
        ("lenet", (16, 16), "channels, height, width"),
        ("torchvision:resnet18", (2, 32, 32), "1 or 3 input channels"),
    ],
)
def test_bad_architectures_and_shapes_are_model_errors(arch: str, shape: tuple, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        build_model(arch, 10, shape)


def test_weights_file_is_refused_for_builtin_architectures(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="only for torchvision"):
        build_model("lenet", 10, (1, 16, 16), weights=tmp_path / "w.pt")


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_preserves_outputs_and_fingerprint(
        saved: Path, lenet: SourceModel) -> None:
    model, meta = load_checkpoint(saved)
    assert not model.training
    assert meta.arch == "lenet" and meta.num_classes == 10 and meta.input_shape == (1, 16, 16)
    assert meta.class_names == tuple(CLASSES)
    assert meta.training == {"dataset": "abc", "accuracy": 0.9, "epochs": 1}
    assert meta.fingerprint == model_fingerprint(model) == model_fingerprint(lenet)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), lenet(x))
    # plain types only: loads with weights_only=True, and no temp file is left behind
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT and isinstance(payload["meta"], str)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_fingerprint_is_deterministic_and_sensitive() -> None:
    def fresh() -> SourceModel:
        torch.manual_seed(1)
        return build_model("caffe_quick", 10, (3, 32, 32))

    a, b = fresh(), fresh()
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.head[-1].bias[0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


def test_load_checkpoint_moves_model_to_device(saved: Path) -> None:
    """'meta' exists on every machine and is not the default (cpu), so ignoring `device` fails here."""
    model, _ = load_checkpoint(saved, device="meta")
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"meta"}
    assert not model.training


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"missing\.pt: model checkpoint not found; train"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is not a torch file at all\n" * 4, "not a model checkpoint"),
        (b"PK\x03\x04" + b"\0" * 64, "corrupted or truncated"),
    ],
    ids=["garbage", "broken-zip"],
)
def test_garbage_is_not_a_checkpoint(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=match):
        load_checkpoint(path)


def test_truncated_checkpoint(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupted or truncated"):
        load_checkpoint(saved)


@pytest.mark.parametrize("kind", ["state_dict", "tensor_list"])
def test_other_torch_files_are_not_checkpoints(tmp_path: Path, lenet: SourceModel, kind: str) -> None:
    path = tmp_path / "plain.pt"
    torch.save(lenet.state_dict() if kind == "state_dict" else [torch.zeros(3)], path)
    with pytest.raises(ModelError, match="not an advpipe model checkpoint") as info:
        load_checkpoint(path)
    assert ("bare state dict" in str(info.value)) == (kind == "state_dict")


class _Payload:
    """Pickles to a call of os.makedirs: loading it without weights_only would create a folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path, lenet: SourceModel) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "meta": "{}", "state_dict": lenet.state_dict(),
                "x": _Payload(marker)}, path)
    with pytest.raises(ModelError, match="refused to load.*arbitrary code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_weights_of_another_architecture_are_named(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    other = build_model("caffe_quick", 10, (1, 16, 16)).state_dict()
    meta = dataclasses.replace(_meta(payload), fingerprint=state_dict_fingerprint(other))
    torch.save({**payload, "meta": meta.to_json(), "state_dict": other}, saved)
    with pytest.raises(ModelError, match="says its model is 'lenet'.*another architecture"):
        load_checkpoint(saved)


def test_expected_architecture_is_checked(saved: Path) -> None:
    with pytest.raises(ModelError, match="holds a 'lenet' model but 'cifar_resnet18' is expected"):
        load_checkpoint(saved, arch="cifar_resnet18")


def test_edited_weights_fail_the_fingerprint(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    payload["state_dict"]["head.3.bias"] += 1.0
    torch.save(payload, saved)
    with pytest.raises(ModelError, match="fingerprint"):
        load_checkpoint(saved)


def test_unreadable_meta(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    torch.save({**payload, "meta": "{not json"}, saved)
    with pytest.raises(ModelError, match="metadata is unreadable"):
        load_checkpoint(saved)


def test_save_checks_class_names_and_json(tmp_path: Path, lenet: SourceModel) -> None:
    with pytest.raises(ModelError, match="3 class names given for a model with 10"):
        save_checkpoint(tmp_path / "a.pt", lenet, ["a", "b", "c"], {})
    with pytest.raises(ModelError, match="plain JSON"):
        save_checkpoint(tmp_path / "a.pt", lenet, CLASSES, {"accuracy": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_check_compatible(saved: Path) -> None:
    _, meta = load_checkpoint(saved)
    check_compatible(meta, 10, (16, 16, 1))
    with pytest.raises(ModelError, match="10 classes but the data has 5"):
        check_compatible(meta, 5, (16, 16, 1))
    with pytest.raises(ModelError, match=r"\(1, 16, 16\) but the images are \(3, 32, 32\)"):
        check_compatible(meta, 10, (32, 32, 3))


# ---------------------------------------------------------------- torchvision weights


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(state, path)
    return path, state


def test_torchvision_weights_are_loaded(resnet18_weights: tuple[Path, dict]) -> None:
    path, state = resnet18_weights
    model = build_model("torchvision:resnet18", 10, (3, 32, 32), weights=path)
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_torchvision_head_is_replaced_for_another_class_count(
        resnet18_weights: tuple[Path, dict], tmp_path: Path) -> None:
    path, state = resnet18_weights
    model = build_model("torchvision:resnet18", 4, (3, 32, 32), weights=path)
    assert model.net.fc.weight.shape == (4, 512)
    assert torch.equal(model.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    # the fine-tuned model is restored without the original weights file
    meta = save_checkpoint(tmp_path / "tv.pt", model, ["a", "b", "c", "d"], {})
    restored, loaded_meta = load_checkpoint(tmp_path / "tv.pt")
    assert loaded_meta.arch == "torchvision:resnet18"
    assert model_fingerprint(restored) == meta.fingerprint


def test_torchvision_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        build_model("torchvision:resnet18", 10, (3, 32, 32), weights=tmp_path / "none.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(3, 2).state_dict(), wrong)
    with pytest.raises(ModelError, match="has no 'fc.weight'"):
        build_model("torchvision:resnet18", 10, (3, 32, 32), weights=wrong)
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(10, 7), "fc.bias": torch.zeros(10)}, other)
    with pytest.raises(ModelError, match="do not fit torchvision:resnet18"):
        build_model("torchvision:resnet18", 10, (3, 32, 32), weights=other)
    evil = tmp_path / "evil.pt"
    torch.save(_Payload(tmp_path / "pwned"), evil)
    with pytest.raises(ModelError, match="refused"):
        build_model("torchvision:resnet18", 10, (3, 32, 32), weights=evil)
    assert not (tmp_path / "pwned").exists()


def _meta(payload: dict):
    from advpipe.models import ModelMeta

    return ModelMeta.from_json(payload["meta"])
