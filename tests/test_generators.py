"""Variant generators: contract, determinism, attack strength, native-vs-ART agreement, validation.

A tiny CNN with the source-model interface is trained for about a second on sklearn's
digits (8x8 upscaled to 16x16, pixels in [0, 1]) so the attacks have something real to
fool. Everything runs single-threaded: on a shared 2-core machine, torch's thread pool
is slower than one thread.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from advpipe.config import VariantConfig, config_from_dict
from advpipe.errors import ConfigError
from advpipe.pipeline.generators import REGISTRY, generator_class, validate_variant, variant_backend
from advpipe.pipeline.generators.base import Generator
from advpipe.pipeline.generators.common import finalize
from advpipe.pipeline.generators.style import choose_styles

SIZE = 16
N = 32


class TinyCNN(nn.Module):
    """The source-model interface: inputs in [0, 1], logits out, `features()` shallow -> deep."""

    num_classes = 10
    input_shape = (1, SIZE, SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (SIZE // 4) ** 2, self.num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = F.max_pool2d(F.relu(self.conv1((x - 0.5) / 0.5)), 2)
        b = F.max_pool2d(F.relu(self.conv2(a)), 2)
        return [a, b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)[-1].flatten(1))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(data.target)


@pytest.fixture(scope="module")
def model(digits: tuple[torch.Tensor, torch.Tensor], one_thread: None) -> TinyCNN:
    x, y = digits
    torch.manual_seed(0)
    net = TinyCNN()
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() > 0.9
    return net


@pytest.fixture(scope="module")
def batch(digits: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The last N digits (not the first, so the class mix differs from training order)."""
    x, y = digits
    seeds = np.arange(N, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(12345)
    return x[-N:].clone(), y[-N:].clone(), seeds


def make(name: str, model: nn.Module | None, backend: str | None = None, **params: object) -> Generator:
    """Build a generator exactly as the pipeline does: validate the variant, then construct."""
    variant = VariantConfig(generator=name, backend=backend, **params)
    cls = generator_class(name)
    return cls(validate_variant(name, variant), model if cls.needs_model else None,
               backend=variant_backend(name, variant))


def fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def l2(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


# Every generator and backend, with cheap parameters.
FAST = [
    ("gaussian", "native", {}),
    ("fgsm", "art", {}),
    ("bim", "art", {}),
    ("deepfool", "art", {"max_iter": 10}),
    ("deepfool", "native", {"max_iter": 10}),
    ("cw", "art", {"max_iter": 5}),
    ("cw", "native", {"max_iter": 5}),
    ("cw", "art", {"norm": "linf", "max_iter": 5, "largest_const": 2.0}),
    ("style", "native", {"steps": 3}),
    ("b1", "native", {}),
    ("b2", "native", {}),
]
FAST_IDS = [f"{name}-{backend}-{'-'.join(map(str, p.values()))}" for name, backend, p in FAST]


def test_registry_resolves() -> None:
    for name in REGISTRY:
        cls = generator_class(name)
        assert issubclass(cls, Generator) and cls.backends
        assert cls.needs_model == (name not in {"gaussian", "b1", "b2"})
    assert generator_class("deepfool").backends == ("art", "native")
    assert generator_class("cw").backends == ("art", "native")


@pytest.mark.parametrize(("name", "backend", "params"), FAST, ids=FAST_IDS)
def test_contract_and_determinism(model, batch, name, backend, params) -> None:
    x, y, seeds = batch
    generator = make(name, model, backend, **params)
    out = generator.generate(x, y, seeds)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(generator.generate(x, y, seeds), out)  # same seeds, same output
    assert torch.equal(x, batch[0])  # input untouched


@pytest.mark.parametrize("name", ["gaussian", "b1", "b2"])
def test_random_variants_follow_the_seeds(batch, name) -> None:
    x, y, seeds = batch
    generator = make(name, None)
    out = generator.generate(x, y, seeds)
    other = generator.generate(x, y, seeds + np.uint64(1))
    differs = (out - other).flatten(1).abs().amax(dim=1) > 0
    assert differs.all()


@pytest.mark.parametrize(
    ("name", "backend", "exact"),
    [("gaussian", "native", True), ("fgsm", "art", True), ("bim", "art", True), ("b1", "native", True),
     ("b2", "native", True), ("deepfool", "native", False), ("cw", "native", False)],
)
def test_output_does_not_depend_on_the_batch(model, batch, name, backend, exact) -> None:
    x, y, seeds = batch
    params = {"max_iter": 5} if name == "cw" else {}
    generator = make(name, model, backend, **params)
    full = generator.generate(x, y, seeds)
    alone = torch.cat([generator.generate(x[i:i + 1], y[i:i + 1], seeds[i:i + 1]) for i in (0, 7)])
    part = generator.generate(x[3:11], y[3:11], seeds[3:11])
    atol = 0.0 if exact else 1e-5  # iterative attacks: conv rounding differs with batch size
    torch.testing.assert_close(alone, full[[0, 7]], rtol=0, atol=atol)
    torch.testing.assert_close(part, full[3:11], rtol=0, atol=atol)


@pytest.mark.parametrize(("name", "eps"), [("fgsm", 0.025), ("bim", 0.03), ("fgsm", 0.2)])
def test_linf_budget_is_respected(model, batch, name, eps) -> None:
    x, y, seeds = batch
    params = {"eps": eps} if eps != 0.03 else {}
    out = make(name, model, **params).generate(x, y, seeds)
    assert (out - x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize(
    ("name", "backend", "params", "rate"),
    [("fgsm", "art", {"eps": 0.2}, 0.5),
     ("bim", "art", {"eps": 0.2, "eps_step": 0.05}, 0.9),
     ("deepfool", "art", {}, 0.9),
     ("deepfool", "native", {}, 0.9),
     ("cw", "art", {"max_iter": 10}, 0.9),
     ("cw", "native", {"max_iter": 10}, 0.9)],
)
def test_attacks_fool_the_model(model, batch, name, backend, params, rate) -> None:
    x, y, seeds = batch
    correct = ~fooled(model, x, y)
    out = make(name, model, backend, **params).generate(x, y, seeds)
    assert fooled(model, out, y)[correct].float().mean() >= rate


def test_minimal_attacks_are_small(model, batch) -> None:
    """DeepFool and C&W find far smaller L2 perturbations than a fooling FGSM step."""
    x, y, seeds = batch
    fgsm_l2 = l2(make("fgsm", model, eps=0.2).generate(x, y, seeds) - x).median()
    for name, backend, params in [("deepfool", "native", {}), ("cw", "native", {"max_iter": 10})]:
        out = make(name, model, backend, **params).generate(x, y, seeds)
        hit = fooled(model, out, y)
        assert l2(out - x)[hit].median() < 0.5 * fgsm_l2, name


def test_native_deepfool_reproduces_art_with_the_art_stop_rule(model, batch) -> None:
    x, y, seeds = batch
    art = make("deepfool", model, "art", max_iter=20).generate(x, y, seeds)
    native = make("deepfool", model, "native", max_iter=20, stop_check="iterate").generate(x, y, seeds)
    torch.testing.assert_close(native, art, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("name", "params"), [("deepfool", {}), ("cw", {"max_iter": 10})])
def test_native_agrees_with_art(model, batch, name, params) -> None:
    """Native defaults: success rate at least ART's, median L2 of successes at most 10% above.

    A smaller L2 at the same success rate is a better minimal attack, so only the upper
    side is bounded (native C&W's Adam lands 10-30% below ART's line search with 50 steps).
    """
    x, y, seeds = batch
    results = {}
    for backend in ("art", "native"):
        out = make(name, model, backend, **params).generate(x, y, seeds)
        hit = fooled(model, out, y)
        results[backend] = (hit.float().mean().item(), l2(out - x)[hit].median().item())
    (art_rate, art_l2), (native_rate, native_l2) = results["art"], results["native"]
    assert native_rate >= art_rate - 0.05, results
    assert native_l2 <= 1.10 * art_l2, results


def test_style_pool_and_seeds() -> None:
    labels = [0, 0, 1, 2, 2, 3]
    choice = choose_styles(labels, list(range(6)))
    assert all(labels[j] != labels[i] for i, j in enumerate(choice))
    assert choose_styles(labels, list(range(6))) == choice
    assert choose_styles(labels, [s + 100 for s in range(6)]) != choice
    # no other class in the batch: another image; alone: itself (mirrored by the generator)
    assert all(j != i for i, j in enumerate(choose_styles([4, 4, 4], [1, 2, 3])))
    assert choose_styles([4], [1]) == [0]


def test_style_changes_with_seeds_and_records_levels(model, batch) -> None:
    x, y, seeds = batch
    generator = make("style", model, steps=3)
    assert generator.describe()["content_layers"] == [1] and generator.describe()["style_layers"] == [0]
    out = generator.generate(x, y, seeds)
    other = generator.generate(x, y, seeds + np.uint64(1))
    assert not torch.equal(out, other)
    alone = generator.generate(x[:1], y[:1], seeds[:1])  # no other image: its own mirror
    assert torch.isfinite(alone).all() and not torch.equal(alone, x[:1])


def test_style_with_local_vgg19_weights(model, batch, tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"])
    weights = tmp_path / "vgg19_features.pt"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, weights)
    x, y, seeds = batch
    generator = make("style", model, steps=2, extractor="vgg19", vgg19_weights=str(weights))
    out = generator.generate(x[:4], y[:4], seeds[:4])
    assert out.shape == (4, 1, SIZE, SIZE) and torch.isfinite(out).all()
    assert generator.describe()["style_layers"] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="not found"):
        make("style", model, extractor="vgg19", vgg19_weights=str(tmp_path / "missing.pt"))


def test_shift_on_colour_images() -> None:
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    seeds = np.arange(4, dtype=np.uint64)
    generator = make("b1", None, hue=0.1, interpolation="bilinear")
    out = generator.generate(x, torch.zeros(4, dtype=torch.long), seeds)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, generator.generate(x, torch.zeros(4, dtype=torch.long), seeds))


def test_attacks_work_under_inference_mode_and_restore_the_model(model, batch) -> None:
    x, y, seeds = batch
    generator = make("cw", model, "native", max_iter=3)
    with torch.inference_mode():
        out = generator.generate(x[:4], y[:4], seeds[:4])
    assert torch.isfinite(out).all()
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_failed_images_become_nan_rows() -> None:
    like = torch.zeros(3, 1, 2, 2)
    raw = torch.full((3, 1, 2, 2), 0.5)
    raw[1, 0, 0, 0] = float("inf")
    raw[2, 0, 1, 1] = 2.0
    out = finalize(raw, like, "test")
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all() and out[2].max() == 1.0


@pytest.mark.parametrize(
    ("variant", "message"),
    [({"generator": "fgsm", "eps": -1}, "parameter 'eps': must be > 0"),
     ({"generator": "fgsm", "eps": 0}, "parameter 'eps': must be > 0"),
     ({"generator": "fgsm", "eps": 8}, "<= 1"),
     ({"generator": "fgsm", "epz": 0.1}, "unknown parameter 'epz'"),
     ({"generator": "fgsmm"}, "unknown generator 'fgsmm'"),
     ({"generator": "fgsm", "backend": "native"}, "backend 'native' is not offered"),
     ({"generator": "bim", "max_iter": 0}, "max_iter"),
     ({"generator": "bim", "eps": 0.005, "eps_step": 0.03}, "must not exceed eps"),
     ({"generator": "gaussian", "sigma": 0}, "sigma"),
     ({"generator": "gaussian", "sigma": 1.5}, "sigma"),
     ({"generator": "deepfool", "overshoot": -0.1}, "overshoot"),
     ({"generator": "deepfool", "stop_check": "overshot"}, "needs backend 'native'"),
     ({"generator": "cw", "backend": "native", "norm": "linf"}, "l2' only"),
     ({"generator": "cw", "confidence": -1}, "confidence"),
     ({"generator": "cw", "binary_search_steps": 0}, "binary_search_steps"),
     ({"generator": "style", "extractor": "vgg19"}, "needs vgg19_weights"),
     ({"generator": "style", "momentum": 1.0}, "momentum"),
     ({"generator": "b2", "hue": 0.7}, "hue"),
     ({"generator": "b1", "degrees": -5}, "degrees")],
)
def test_invalid_params_are_config_errors(variant, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_variant("v", VariantConfig(**variant))


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ValidationError):
        VariantConfig(generator="fgsm", backend="tensorflow")
    with pytest.raises(ConfigError, match="backend"):
        config_from_dict({"variants": {"fgsm": {"backend": "tensorflow"}}})


def test_defaults_match_methods() -> None:
    def params(name: str, backend: str | None = None) -> dict:
        return validate_variant(name, VariantConfig(generator=name, backend=backend)).model_dump()

    assert params("gaussian")["sigma"] == 0.1
    assert params("fgsm")["eps"] == 0.025
    assert {k: params("bim")[k] for k in ("eps", "eps_step", "max_iter")} == {
        "eps": 0.03, "eps_step": 0.005, "max_iter": 6}
    assert params("deepfool")["overshoot"] == 0.02 and params("deepfool")["max_iter"] == 50
    cw = params("cw")
    assert (cw["initial_const"], cw["learning_rate"], cw["confidence"]) == (1.0, 0.005, 0.0)
    style = params("style")
    assert (style["lr"], style["momentum"], style["steps"]) == (0.1, 0.9, 10)
    assert params("b1")["degrees"] == 15 and params("b1")["brightness"] == 0.8
    assert params("b2")["degrees"] == 20 and params("b2")["saturation"] == 2.0


def test_validating_a_config_does_not_import_art() -> None:
    code = ("import sys; from advpipe.config import VariantConfig; "
            "from advpipe.pipeline.generators import validate_variant, REGISTRY; "
            "[validate_variant(n, VariantConfig()) for n in REGISTRY]; "
            "assert 'art' not in sys.modules, 'art imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
