"""Weight-map layers (METHODS.md section 6) against a naive reference, and the paper's skeletons in the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from advpipe.batch import Batch
from advpipe.config import OptimConfig
from advpipe.errors import ConfigError, ModelError
from advpipe.models import ARCHITECTURES, build_model, load_checkpoint, save_checkpoint
from advpipe.models.weight_map import WeightMap2d, check_weight_map_sizes, weight_map_layers
from advpipe.trainers.loop import fit
from advpipe.trainers.registry import MethodContext
from advpipe.trainers.weight_map import WeightMapMethod

WM_ARCHS = [arch for arch in ARCHITECTURES if arch.startswith("wm_")]


def wm_params(**values):
    return WeightMapMethod(**values).params


def context(arch: str) -> MethodContext:
    return MethodContext(variant_names=["clean"], variant_kinds={}, checkpoint=None, arch=arch, num_classes=10,
                         input_shape=(1, 16, 16))


def naive_weight_map(layer: WeightMap2d, x: Tensor) -> Tensor:
    """The paper's eqs. 1-4 literally: every map m[n, co, ci] = W[co, ci] * x[n, ci] held at once, each filtered."""
    n, k = x.shape[0], layer.kernel_size
    maps = layer.weight.unsqueeze(0) * x.unsqueeze(1)  # (N, C_o, C_i, H, W): what the layer must never build
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    pad = k // 2 if layer.padding == "same" else 0
    stride = layer.stride if layer.downsample == "stride" else 1
    box = F.conv2d(flat, torch.ones(1, 1, k, k), padding=pad, stride=stride)
    if layer.reduction == "smoothing":
        per_map = box
    else:
        centre = torch.zeros(1, 1, k, k)
        centre[0, 0, k // 2, k // 2] = 1.0
        per_map = 2 * F.conv2d(flat, centre, padding=pad, stride=stride) - box  # eq. 3, map by map
    out = per_map.reshape(n, layer.out_channels, layer.in_channels, *per_map.shape[-2:]).sum(dim=2) + layer.bias
    if layer.downsample == "maxpool":
        out = F.max_pool2d(out, layer.stride)
    elif layer.downsample == "avgpool":
        out = F.avg_pool2d(out, layer.stride)
    return out


GEOMETRIES = [  # (padding, kernel, stride, downsample)
    ("same", 3, 1, "stride"), ("valid", 3, 1, "stride"), ("same", 5, 1, "stride"),
    ("same", 3, 2, "stride"), ("valid", 3, 2, "stride"), ("same", 5, 3, "stride"), ("same", 1, 2, "stride"),
    ("same", 3, 2, "maxpool"), ("valid", 3, 2, "avgpool"),
]


@pytest.mark.parametrize("reduction", ["smoothing", "unsharp"])
@pytest.mark.parametrize(("padding", "kernel", "stride", "downsample"), GEOMETRIES,
                         ids=[f"{p}-k{k}-s{s}-{d}" for p, k, s, d in GEOMETRIES])
def test_layer_equals_the_naive_reference(reduction: str, padding: str, kernel: int, stride: int,
                                          downsample: str) -> None:
    torch.manual_seed(0)
    layer = WeightMap2d(3, 4, (9, 8), kernel, reduction=reduction, padding=padding, stride=stride,
                        downsample=downsample)
    x = torch.rand(2, 3, 9, 8, requires_grad=True)
    out = layer(x)
    expected = naive_weight_map(layer, x)
    assert out.shape == expected.shape == (2, 4, *layer.output_size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and so are the gradients the optimiser and attacks see
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad_out)
    want = torch.autograd.grad(expected, (x, layer.weight, layer.bias), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_never_holds_the_per_map_tensor() -> None:
    """N x C_o x C_i x D x D would be 16.8 MB here; no allocation of forward + backward comes near it."""
    layer = WeightMap2d(32, 32, 16, 3, reduction="unsharp")
    x = torch.rand(16, 32, 16, 16, requires_grad=True)
    full_bytes = 16 * 32 * 32 * 16 * 16 * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        layer(x).sum().backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < full_bytes / 8


def test_initialisation_is_uniform_within_one_over_sqrt_fan_in() -> None:
    torch.manual_seed(0)
    layer = WeightMap2d(4, 6, 10, 3)
    bound = 1 / 6  # fan-in 4 channels x 3 x 3
    for tensor in (layer.weight, layer.bias):
        assert tensor.abs().max() <= bound
        assert tensor.abs().max() > 0.97 * bound
        assert abs(tensor.mean().item()) < 0.02
    assert layer.bias.shape == (6, 10, 10)


def test_cnn_skeletons_have_the_papers_parameter_counts() -> None:
    """Table 4 on 28x28 MNIST: plain CNN 261K, smoothing WM 1.16M, unsharp WM 1.49M parameters."""
    counts = {arch: sum(p.numel() for p in build_model(arch, 10, (1, 28, 28)).parameters())
              for arch in ("wm_cnn_conv", "wm_cnn_smoothing", "wm_cnn_unsharp")}
    assert round(counts["wm_cnn_conv"] / 1e3) == 261
    assert round(counts["wm_cnn_smoothing"] / 1e4) == 116
    assert round(counts["wm_cnn_unsharp"] / 1e4) == 149


@pytest.mark.parametrize(("arch", "layers", "weight_maps"), [
    ("wm_resnet_conv", 34, 0), ("wm_resnet_unsharp", 34, 34), ("wm_resnet_smoothing_alt", 34, 17),
    ("wm_densenet_conv", 31, 0), ("wm_densenet_smoothing", 31, 31), ("wm_densenet_unsharp_alt", 31, 15),
])
def test_resnet_and_densenet_replace_all_or_every_second_layer(arch: str, layers: int, weight_maps: int) -> None:
    model = build_model(arch, 10, (1, 28, 28))
    body = [m for name, m in model.named_modules()
            if isinstance(m, WeightMap2d) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))]
    assert len(body) == layers  # Table 2: 17 blocks x 2 layers; Table 3: stem + 30 dense layers
    kinds = [isinstance(m, WeightMap2d) for m in body]
    assert sum(kinds) == weight_maps
    if arch.endswith("_alt"):
        assert kinds == [index % 2 == 1 for index in range(layers)]


@pytest.mark.parametrize("arch", WM_ARCHS)
def test_every_skeleton_is_a_source_model_with_input_gradients(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 5, (1, 16, 16))
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    maps = model.features(x)
    assert 3 <= len(maps) <= 5


def test_weight_map_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("wm_resnet_unsharp_alt", 3, (1, 16, 16))
    save_checkpoint(tmp_path / "wm.pt", model, ["a", "b", "c"], {})
    loaded, meta = load_checkpoint(tmp_path / "wm.pt", arch="wm_resnet_unsharp_alt")
    x = torch.rand(3, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_weight_map_method_trains_the_cnn_skeleton() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 8, 8, generator=generator)
    y = (x[..., :4].mean(dim=(1, 2, 3)) > x[..., 4:].mean(dim=(1, 2, 3))).long()
    loader = DataLoader(TensorDataset(x, y, torch.arange(256)), batch_size=32,
                        collate_fn=lambda items: Batch.clean(*(torch.stack(c) for c in zip(*items, strict=True))))
    torch.manual_seed(0)
    method = WeightMapMethod(skeleton="cnn", reduction="unsharp")
    model = build_model("wm_cnn_unsharp", 2, (1, 8, 8))
    history = fit(model, method, loader, eval_loader=loader, progress=False,
                  optim=OptimConfig(optimizer="adam", lr=0.003, epochs=6, batch_size=32, weight_decay=0.0))
    assert history[-1]["eval_acc"] > 0.9


def test_bad_input_is_refused_with_the_layer_named() -> None:
    layer = WeightMap2d(3, 4, 8, name="stages.0.0")
    with pytest.raises(ModelError, match=r"layer 'stages.0.0' was built for inputs \(C, H, W\) = \(3, 8, 8\) but got "
                                         r"\(3, 6, 6\)"):
        layer(torch.rand(1, 3, 6, 6))
    stack = nn.Sequential(WeightMap2d(3, 4, 8, padding="valid"), WeightMap2d(4, 4, 8))
    with pytest.raises(ModelError, match=r"weight-map layer '1' was built for .* \(4, 8, 8\) but got \(4, 6, 6\)"):
        check_weight_map_sizes(stack, (3, 8, 8))
    with pytest.raises(ModelError, match="kernel size must be odd"):
        WeightMap2d(3, 4, 8, 4, name="even")
    with pytest.raises(ModelError, match="'layer 3'.*smaller than the 3x3 box filter"):
        build_model("wm_cnn_smoothing", 10, (1, 5, 5))
    with pytest.raises(ModelError, match="dense block 4.*at least 16x16"):
        build_model("wm_densenet_unsharp", 10, (1, 4, 4))
    with pytest.raises(ModelError, match="model lenet has no WeightMap2d layer"):
        WeightMapMethod().setup(build_model("lenet", 10, (1, 16, 16)), torch.device("cpu"))
    with pytest.raises(ConfigError, match="weight_map.reduction is 'smoothing' but the architecture "
                                          "'wm_resnet_unsharp_alt' has reduction 'unsharp'"):
        WeightMapMethod(reduction="smoothing").setup(build_model("wm_resnet_unsharp_alt", 10, (1, 16, 16)),
                                                     torch.device("cpu"))
    with pytest.raises(ConfigError, match="but the architecture is 'lenet'"):
        WeightMapMethod.build(wm_params(), context(arch="lenet"))
    with pytest.raises(ConfigError, match="'wm_cnn_conv' is the plain-convolution twin"):
        WeightMapMethod.build(wm_params(), context(arch="wm_cnn_conv"))
    assert isinstance(WeightMapMethod.build(wm_params(layout="alternate"),
                                            context(arch="wm_densenet_smoothing_alt")), WeightMapMethod)
    with pytest.raises(ConfigError, match="parameter 'reduction'"):
        wm_params(reduction="sharpen")
    assert [name for name, _ in weight_map_layers(build_model("wm_cnn_unsharp", 10, (1, 8, 8)))] == [
        "stages.0.0", "stages.1.0", "stages.2.0"]
