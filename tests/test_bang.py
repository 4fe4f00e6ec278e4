"""BANG (METHODS.md section 4): exact ordinary gradients at eps 0, and per-sample scaling checked by brute force."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from advpipe.batch import Batch
from advpipe.config import OptimConfig
from advpipe.errors import ConfigError, ModelError
from advpipe.trainers import bang as bang_module
from advpipe.trainers.bang import PRESETS, BangMethod, BangParams, bang_layers, bang_scale, preset
from advpipe.trainers.loop import fit

CLASSES = 4
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def bang_params_of(**values):
    return BangMethod(**values).params


def conv_linear_net(seed: int = 1) -> nn.Sequential:
    """Convolutions (zero, uneven 'same' and reflect padding, a stride) and linear layers; nothing couples samples."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, padding="same"), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, CLASSES),
    )


def data(seed: int = 0, n: int = 6) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 6, 6, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def batch_of(x: Tensor, y: Tensor) -> Batch:
    return Batch.clean(x, y, torch.arange(len(y)))


def bang_gradients(method: BangMethod, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One BANG backward through the method's hooks; returns the input gradient (parameters keep theirs)."""
    method.setup(model, torch.device("cpu"))
    x = x.clone().requires_grad_(True)
    loss, _ = method.training_step(model, batch_of(x, y), None)  # type: ignore[arg-type]
    loss.backward()
    method.after_backward(model, batch_of(x, y), None)  # type: ignore[arg-type]
    method.teardown(model)
    return x.grad


def plain_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return x.grad


def brute_force_bang(model: nn.Module, x: Tensor, y: Tensor, eps: dict[str, float], beta: dict[str, float],
                     ratio: float) -> dict[str, Tensor]:
    """Eq. 2-6 sample by sample: k_i at each layer output, eta_i from their norms, beta * sum_i eta_i dE_i/dw."""
    layers = dict(bang_layers(model))
    outputs: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            output.retain_grad()
            outputs[name] = output
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    n = len(y)
    norms: dict[str, list[float]] = {name: [] for name in layers}
    grads: dict[str, list[list[Tensor]]] = {name: [] for name in layers}
    wrong = []
    for i in range(n):
        model.zero_grad()
        logits = model(x[i:i + 1])
        wrong.append(bool(logits.argmax(dim=1).item() != y[i].item()))
        (F.cross_entropy(logits, y[i:i + 1]) / n).backward()  # sample i's share of the batch-mean loss
        for name, module in layers.items():
            norms[name].append(outputs[name].grad.norm().item())
            grads[name].append([p.grad.clone() for p in module.parameters(recurse=False)])
    for handle in handles:
        handle.remove()
    expected = {}
    for name, module in layers.items():
        peak = max(norms[name])
        total = [torch.zeros_like(p) for p in module.parameters(recurse=False)]
        for i in range(n):
            eps_i = eps[name] * (ratio if wrong[i] else 1.0)
            rho = eps_i * (1 - norms[name][i] / peak)
            eta = (peak / norms[name][i]) ** rho if norms[name][i] > 0 else 1.0
            for t, g in zip(total, grads[name][i], strict=True):
                t += beta[name] * eta * g
        for (pname, _), t in zip(module.named_parameters(recurse=False), total, strict=True):
            expected[f"{name}.{pname}"] = t
    return expected


def test_eps_zero_beta_one_gives_exactly_the_standard_gradients() -> None:
    x, y = data()
    plain, bang = conv_linear_net(), conv_linear_net()
    plain_x = plain_gradients(plain, x, y)
    bang_x = bang_gradients(BangMethod(eps=0.0, beta=1.0, misclassified_ratio=0.5), bang, x, y)
    assert torch.equal(plain_x, bang_x)
    for (name, p), q in zip(plain.named_parameters(), bang.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("input_side", [False, True], ids=["scale-output-grad", "scale-input"])
@pytest.mark.parametrize("misclassified", [False, True], ids=["all-correct", "some-misclassified"])
def test_scaled_weight_gradients_match_a_per_sample_loop_and_input_gradient_is_unchanged(
        misclassified: bool, input_side: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both placements of the convolution factors (CPU default: output gradient; GPU default: layer input)."""
    monkeypatch.setattr(bang_module, "scale_input_side", lambda grad: input_side)
    x, y = data(seed=3)
    reference = conv_linear_net()
    with torch.no_grad():
        predicted = reference(x).argmax(dim=1)
    y = predicted.clone()
    if misclassified:
        y[::2] = (predicted[::2] + 1) % CLASSES
    eps, beta, ratio = 0.84, 0.7, 0.5
    layer_eps, layer_beta = {"0": 0.3}, {"10": 1.3}  # per-layer overrides: first conv, last linear

    plain, bang = conv_linear_net(), conv_linear_net()
    plain_x = plain_gradients(plain, x, y)
    method = BangMethod(eps=eps, beta=beta, misclassified_ratio=ratio, layer_eps=layer_eps, layer_beta=layer_beta)
    bang_x = bang_gradients(method, bang, x, y)
    torch.testing.assert_close(bang_x, plain_x, rtol=1e-6, atol=1e-9)  # lower layers get the ordinary gradient

    names = [name for name, _ in bang_layers(reference)]
    expected = brute_force_bang(reference, x, y, {n: layer_eps.get(n, eps) for n in names},
                                {n: layer_beta.get(n, beta) for n in names}, ratio)
    got = dict(bang.named_parameters())
    assert set(expected) == set(got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].grad, value, rtol=1e-5, atol=1e-5, msg=name)
    # and BANG really changed them: the scaled gradients are not the plain ones
    assert not torch.allclose(got["3.weight"].grad, dict(plain.named_parameters())["3.weight"].grad, atol=1e-4)


def test_eta_follows_equations_3_and_4() -> None:
    grad_out = torch.zeros(4, 2)
    grad_out[0, 0], grad_out[1, 1], grad_out[2, 0] = 1.0, 2.0, 4.0  # norms 1, 2, 4, 0
    eta = bang_scale(grad_out, 0.5)
    # eta = (4 / n) ** (0.5 * (1 - n / 4)); the largest gradient keeps 1, a zero gradient gets 1
    expected = torch.tensor([4 ** 0.375, 2 ** 0.25, 1.0, 1.0])
    torch.testing.assert_close(eta, expected)
    assert torch.equal(bang_scale(torch.zeros(3, 5), 0.8), torch.ones(3))


def test_presets_are_the_reference_settings() -> None:
    mnist, cifar = preset("mnist"), preset("cifar10")
    assert (mnist.params.eps, mnist.params.beta, mnist.params.misclassified_ratio, mnist.batch_size) == (
        0.815, 1.0, 1.0, 64)
    assert (cifar.params.eps, cifar.params.beta, cifar.params.misclassified_ratio, cifar.batch_size) == (
        0.855, 0.4, 0.5, 100)
    assert set(PRESETS) == {"mnist", "cifar10"}
    # a config entry {method: bang, preset: cifar10, beta: 0.6}: the preset fills what is not given
    params = BangParams.model_validate({"preset": "cifar10", "beta": 0.6})
    assert (params.eps, params.beta, params.misclassified_ratio) == (0.855, 0.6, 0.5)


def test_works_under_bf16_autocast_and_in_a_deep_copy() -> None:
    """The loop's amp runs training_step under autocast; a deep copy of a wrapped model uses its own weights."""
    x, y = data()
    plain, bang = conv_linear_net(), conv_linear_net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(plain(x), y).backward()
    method = BangMethod(eps=0.0)
    method.setup(bang, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = method.training_step(bang, batch_of(x, y), None)  # type: ignore[arg-type]
    loss.backward()
    for (name, p), q in zip(plain.named_parameters(), bang.parameters(), strict=True):
        assert q.grad.dtype == torch.float32
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    assert metrics["correct"].shape == (len(y),) and metrics["correct"].dtype == torch.bool

    twin = copy.deepcopy(bang)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2.0)
    with torch.no_grad():
        assert not torch.allclose(twin(x), bang(x))
    method.teardown(bang)


def test_bang_trains_through_the_shared_loop_and_leaves_the_model_plain() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 4, 4, generator=generator)
    y = (x[..., :2].mean(dim=(1, 2, 3)) > x[..., 2:].mean(dim=(1, 2, 3))).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False,
                        collate_fn=lambda items: batch_of(*(torch.stack(c) for c in zip(*items, strict=True))))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    history = fit(model, BangMethod(**PRESETS["cifar10"].params.model_dump()), loader,
                  optim=OptimConfig(optimizer="adam", lr=0.02, epochs=8, batch_size=32, weight_decay=0.0),
                  eval_loader=loader, progress=False)
    assert history[-1]["eval_acc"] > 0.9
    assert all("forward" not in vars(m) for m in model.modules())  # teardown restored the class forward


def one_image_loader(x: Tensor, y: Tensor, steps: int = 1) -> list[Batch]:
    return [batch_of(x, y)] * steps


def test_beta_scales_the_weight_decay_part_of_the_update_too() -> None:
    """One SGD step (lr 0.1, weight decay 0.5, no momentum) with beta 2 on a 2x2 layer, by hand.

    W = I, b = 0, x = (1, 0), y = 0: logits (1, 0), dCE/dlogits = (-s, s) with s = 1 / (1 + e), so
    dL/dW = [[-s, 0], [s, 0]] and dL/db = (-s, s). The whole update is beta * lr * (grad + decay * w):
    W' = [[1 - 0.2 (0.5 - s), 0], [-0.2 s, 1 - 0.2 * 0.5]], b' = (0.2 s, -0.2 s).
    """
    s = 1 / (1 + math.e)
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.zero_()
    model = nn.Sequential(layer)
    optim = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.5, epochs=1, schedule="constant")
    fit(model, BangMethod(eps=0.815, beta=2.0), one_image_loader(torch.tensor([[1.0, 0.0]]), torch.tensor([0])),
        optim=optim, progress=False)
    expected_w = torch.tensor([[0.9 + 0.2 * s, 0.0], [-0.2 * s, 0.9]])
    assert torch.allclose(layer.weight, expected_w, atol=1e-6), layer.weight  # the old code: w11 = 0.95
    assert torch.allclose(layer.bias, torch.tensor([0.2 * s, -0.2 * s]), atol=1e-6)


def test_beta_acts_as_a_learning_rate_factor_under_sgd_with_momentum_and_decay() -> None:
    """eps 0: BANG with beta 1.5 at lr 0.02 takes the steps plain training takes at lr 0.03, decay included."""
    x, y = data(n=8)
    optim = OptimConfig(optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=0.05, epochs=1, schedule="constant")
    scaled, plain = conv_linear_net(), conv_linear_net()
    fit(scaled, BangMethod(eps=0.0, beta=1.5), one_image_loader(x, y, 4), optim=optim, progress=False)
    fit(plain, BangMethod(eps=0.0, beta=1.0), one_image_loader(x, y, 4),
        optim=optim.model_copy(update={"lr": 0.03}), progress=False)
    for (name, p), q in zip(scaled.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_bad_input_is_refused_with_the_offending_name() -> None:
    with pytest.raises(ModelError, match="Sequential has no nn.Linear or nn.Conv2d"):
        BangMethod().setup(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"bang.layer_beta names fc9"):
        BangMethod(layer_beta={"fc9": 2.0}).setup(conv_linear_net(), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"method 'bang': parameter 'eps': Input should be greater than or equal"):
        bang_params_of(eps=-0.1)
    with pytest.raises(ConfigError, match=r"parameter 'misclassified_ratio'"):
        BangMethod(misclassified_ratio=-1)
    with pytest.raises(ConfigError, match=r"parameter 'layer_eps.0'"):
        bang_params_of(layer_eps={"0": -1.0})
    with pytest.raises(ConfigError, match="unknown parameter 'epsilon'"):
        bang_params_of(epsilon=0.8)
    with pytest.raises(ConfigError, match="parameter 'preset'"):
        bang_params_of(preset="imagenet")
    assert math.isclose(bang_params_of(eps=0.8).eps, 0.8)
