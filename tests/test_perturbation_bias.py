"""Adversarial perturbation bias (METHODS.md section 5): FGSM perturbations inside the budget eps_ap, folding,
checkpoints."""

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
from advpipe.models import build_model, load_checkpoint, save_checkpoint
from advpipe.models.lenet import LeNet
from advpipe.trainers.loop import build_optimizer, fit
from advpipe.trainers.perturbation_bias import (
    PerturbationBiasLinear,
    PerturbationBiasMethod,
    perturbation_bias_layers,
)

EPS = 0.25  # a power of two: d stays on a grid of exact floats, so a step is exactly +/- EPS


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.bias.zero_()
    return model


def random_batch(n: int = 32, seed: int = 0, variant: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 4, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    return Batch(x=x, y=y, variant=torch.full((n,), variant), index=torch.arange(n))


def sgd() -> OptimConfig:
    """Momentum and weight decay: either would move d off the eps_ap grid if the optimiser touched it."""
    return OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.1, epochs=1, batch_size=32)


@pytest.mark.parametrize("direction", ["ascent", "descent"])
def test_naive_bias_is_its_origin_plus_the_fgsm_perturbation_of_the_current_gradient(direction: str) -> None:
    """update fgsm (the default): d = d0 + s * eps_ap * sign(dL/dd) of the latest batch, never a sum of steps."""
    model = mlp()
    with torch.no_grad():
        model[3].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))  # d0: the bias the layer was converted from
    method = PerturbationBiasMethod(eps_ap=EPS, direction=direction, fold_at_end=False)
    method.setup(model, torch.device("cpu"))
    layers = perturbation_bias_layers(model)
    assert [name for name, _ in layers] == ["1", "3"]
    optimizer = build_optimizer(method.parameters(model), sgd())
    sign = 1.0 if direction == "ascent" else -1.0
    weight_before = model[1].weight.detach().clone()
    origins = {"1": torch.zeros(8), "3": torch.tensor([0.5, -1.0, 2.0])}
    for step in range(3):
        batch = random_batch(seed=step, variant=step % 2)  # clean and adversarial batches alike
        optimizer.zero_grad(set_to_none=True)
        loss, _ = method.training_step(model, batch, None)  # type: ignore[arg-type]
        loss.backward()
        grads = [layer.perturbation.grad.clone() for _, layer in layers]
        method.after_backward(model, batch, None)  # type: ignore[arg-type]
        optimizer.step()
        assert torch.all(grads[1] != 0)  # every output unit has a gradient (hidden ones may be dead ReLUs)
        for (name, layer), grad in zip(layers, grads, strict=True):
            assert torch.equal(layer.perturbation.detach(), sign * EPS * grad.sign()), (name, step)
            assert torch.equal(layer.bias().detach(), origins[name] + sign * EPS * grad.sign()), (name, step)
    assert not torch.equal(model[1].weight.detach(), weight_before)  # the optimiser trains W


def test_projected_update_takes_sign_steps_and_stays_on_the_eps_ball() -> None:
    """update projected: delta <- clip(delta + step_ap * sign(g), -eps_ap, eps_ap); a step past the ball is cut."""
    model = mlp()
    method = PerturbationBiasMethod(eps_ap=EPS, update="projected", step_ap=EPS / 2, fold_at_end=False)
    method.setup(model, torch.device("cpu"))
    layer = dict(perturbation_bias_layers(model))["3"]
    optimizer = build_optimizer(method.parameters(model), sgd())
    for step in range(6):
        batch = random_batch(seed=step)
        optimizer.zero_grad(set_to_none=True)
        method.training_step(model, batch, None)[0].backward()  # type: ignore[arg-type]
        before, grad = layer.perturbation.detach().clone(), layer.perturbation.grad.clone()
        method.after_backward(model, batch, None)  # type: ignore[arg-type]
        optimizer.step()
        expected = torch.clamp(before + EPS / 2 * grad.sign(), -EPS, EPS)
        assert torch.equal(layer.perturbation.detach(), expected), step
    assert layer.perturbation.detach().abs().max() == EPS  # the steps reached the budget and stopped there


def digits_loaders(batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's bundled 8x8 digits as flat vectors: 1,400 training and 397 test images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))

    def loader(index: Tensor, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDataset(x[index], y[index], torch.arange(len(index))), batch_size=batch_size,
                          shuffle=shuffle, generator=torch.Generator().manual_seed(1),
                          collate_fn=lambda items: Batch.clean(*(torch.stack(c) for c in zip(*items, strict=True))))

    return loader(order[:1400], True), loader(order[1400:], False)


class Watched(PerturbationBiasMethod):
    """Records, after every update of the bias, how far each layer's perturbation is from where it started."""

    def setup(self, model: nn.Module, device: torch.device) -> None:
        super().setup(model, device)
        self.start = {name: layer.bias().detach().clone() for name, layer in perturbation_bias_layers(model)}
        self.largest: list[float] = []  # per step: max over layers of |d - d0| (naive) or |m| (multimodal)

    def after_backward(self, model: nn.Module, batch: Batch, ctx) -> None:  # type: ignore[no-untyped-def]
        super().after_backward(model, batch, ctx)
        sizes = []
        for name, layer in perturbation_bias_layers(model):
            if layer.kind == "naive":
                sizes.append(float((layer.bias().detach() - self.start[name]).abs().max()))
            else:
                sizes.append(float(layer.memories.detach().abs().max()))
        self.largest.append(max(sizes))


@pytest.mark.parametrize("kind", ["naive", "multimodal"])
@pytest.mark.parametrize("update", ["fgsm", "projected"])
def test_bias_stays_in_its_budget_and_accuracy_holds_as_a_cosine_schedule_decays(kind: str, update: str) -> None:
    """Issue 21: a sum of sign steps outside the optimiser grew without bound (|d| about 28 here) and test
    accuracy fell to about 0.2 as the learning rate decayed. Within the budget neither happens."""
    train, test = digits_loaders()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    eps = 0.05
    options = {"update": update} if update != "fgsm" else {}  # the default: fgsm
    method = Watched(kind=kind, eps_ap=eps, memories=16, fold_at_end=False, **options)
    history = fit(model, method, train, eval_loader=test, progress=False,
                  optim=OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, epochs=20,
                                    batch_size=32, schedule="cosine"))
    assert len(method.largest) == 20 * len(train)  # 880 steps, every one checked
    assert max(method.largest) <= eps * (1 + 1e-6)
    assert max(method.largest) >= eps / 2  # the bias is in use, not switched off
    assert history[-1]["eval_acc"] >= 0.85
    assert history[-1]["perturbation_linf"] <= eps * (1 + 1e-6)


def test_multimodal_memories_take_the_fgsm_step_and_the_bias_weights_train() -> None:
    model = mlp()
    method = PerturbationBiasMethod(kind="multimodal", memories=5, eps_ap=EPS, fold_at_end=False)
    method.setup(model, torch.device("cpu"))
    layer = dict(perturbation_bias_layers(model))["3"]
    assert layer.memories.shape == (1, 5) and layer.memory_weight.shape == (5, 3)
    optimizer = build_optimizer(method.parameters(model), sgd())
    assert {id(p) for p in optimizer.param_groups[0]["params"]} >= {id(layer.memory_weight)}
    assert id(layer.memories) not in {id(p) for p in optimizer.param_groups[0]["params"]}
    outputs: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: tuple, out: Tensor) -> None:
        out.retain_grad()
        outputs.append(out)

    for step in range(2):
        outputs.clear()
        handle = layer.register_forward_hook(keep)
        batch = random_batch(seed=step)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = method.training_step(model, batch, None)  # type: ignore[arg-type]
        loss.backward()
        handle.remove()
        # Alg. 2: dm = sign(W_ap . sum over the batch of dL/dy); m is that FGSM perturbation of size eps_ap
        expected_sign = (layer.memory_weight.detach() @ outputs[0].grad.sum(dim=0)).sign()
        bias_weight_before = layer.memory_weight.detach().clone()
        method.after_backward(model, batch, None)  # type: ignore[arg-type]
        optimizer.step()
        assert torch.all(expected_sign != 0)
        assert torch.equal(layer.memories.detach(), EPS * expected_sign.unsqueeze(0))
        assert not torch.equal(layer.memory_weight.detach(), bias_weight_before)


@pytest.mark.parametrize("kind", ["naive", "multimodal"])
def test_folded_model_gives_the_same_outputs_and_is_plain_linear(kind: str) -> None:
    model = mlp()
    method = PerturbationBiasMethod(kind=kind, memories=7, eps_ap=0.05)
    method.setup(model, torch.device("cpu"))
    optimizer = build_optimizer(method.parameters(model), sgd())
    for step in range(3):
        batch = random_batch(seed=step)
        optimizer.zero_grad(set_to_none=True)
        method.training_step(model, batch, None)[0].backward()  # type: ignore[arg-type]
        method.after_backward(model, batch, None)  # type: ignore[arg-type]
        optimizer.step()
    x = torch.rand(10, 1, 4, 4)
    with torch.no_grad():
        before = model(x)
        bias_before = dict(perturbation_bias_layers(model))["3"].bias().clone()
        exported = method.export(model)  # mid-training model file: a folded copy, training goes on unfolded
        torch.testing.assert_close(exported(x), before, rtol=0, atol=1e-6)
    assert [type(m) for m in exported] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert len(perturbation_bias_layers(model)) == 2
    assert bias_before.abs().sum() > 0
    method.teardown(model)  # folds
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert set(model.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert torch.equal(model[3].bias.detach(), bias_before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_checkpoint_of_a_folded_model_loads_as_the_plain_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lenet", 3, (1, 16, 16))
    method = PerturbationBiasMethod(kind="multimodal", memories=4, eps_ap=0.05)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.rand(64, 1, 16, 16, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels, torch.arange(64)), batch_size=32,
                        collate_fn=lambda items: Batch.clean(*(torch.stack(c) for c in zip(*items, strict=True))))
    fit(model, method, loader, optim=OptimConfig(optimizer="adam", lr=0.01, epochs=2, batch_size=32,
                                                 weight_decay=0.0), progress=False)
    assert not perturbation_bias_layers(model)  # fit's teardown folded them
    path = tmp_path / "folded.pt"
    save_checkpoint(path, model, ["a", "b", "c"], {"method": "perturbation_bias"})
    loaded, meta = load_checkpoint(path, arch="lenet")
    assert type(loaded) is LeNet and meta.arch == "lenet"
    assert set(loaded.state_dict()) == set(build_model("lenet", 3, (1, 16, 16)).state_dict())
    model.eval()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_method_trains_through_the_shared_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 4, 4, generator=generator)
    y = (x[..., :2].mean(dim=(1, 2, 3)) > x[..., 2:].mean(dim=(1, 2, 3))).long()
    loader = DataLoader(TensorDataset(x, y, torch.arange(256)), batch_size=32,
                        collate_fn=lambda items: Batch.clean(*(torch.stack(c) for c in zip(*items, strict=True))))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    history = fit(model, PerturbationBiasMethod(eps_ap=0.001), loader, eval_loader=loader, progress=False,
                  optim=OptimConfig(optimizer="adam", lr=0.02, epochs=16, batch_size=32, weight_decay=0.0))
    assert history[-1]["eval_acc"] > 0.9
    assert history[-1]["perturbation_bias_abs"] > 0


def test_bad_input_is_refused_with_the_offending_name() -> None:
    conv_only = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ModelError, match="Sequential has no fully connected layer"):
        PerturbationBiasMethod().setup(conv_only, torch.device("cpu"))
    with pytest.raises(ModelError, match="no fully connected layer with a bias"):
        PerturbationBiasMethod().setup(nn.Sequential(nn.Linear(3, 2, bias=False)), torch.device("cpu"))
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="method 'perturbation_bias': parameter 'eps_ap'"):
            PerturbationBiasMethod(eps_ap=bad)
    with pytest.raises(ConfigError, match="layer 'head.fc': eps_ap"):
        PerturbationBiasLinear(4, 2, eps_ap=0.0, name="head.fc")
    with pytest.raises(ConfigError, match="names 'fc9'.*its Linear layers: 1, 3"):
        PerturbationBiasMethod(layers=("fc9",)).setup(mlp(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="names '0', which has no bias"):
        PerturbationBiasMethod(layers=("0",)).setup(nn.Sequential(nn.Linear(3, 2, bias=False)), torch.device("cpu"))
    with pytest.raises(ConfigError, match="parameter 'memories'"):
        PerturbationBiasMethod(kind="multimodal", memories=0)
    with pytest.raises(ConfigError, match="parameter 'direction'"):
        PerturbationBiasMethod(direction="sideways")
    with pytest.raises(ConfigError, match="unknown parameter 'eps'"):
        PerturbationBiasMethod(eps=0.1)
    with pytest.raises(ConfigError, match="parameter 'update'"):
        PerturbationBiasMethod(update="sum")
    with pytest.raises(ConfigError, match="step_ap .* applies only to update 'projected'"):
        PerturbationBiasMethod(step_ap=0.005)
    with pytest.raises(ConfigError, match="parameter 'step_ap'"):
        PerturbationBiasMethod(update="projected", step_ap=0.0)


def test_converting_keeps_the_outputs_of_the_model() -> None:
    """A naive d starts at the layer's bias, so converting a trained model does not change it."""
    model = mlp()
    with torch.no_grad():
        model[3].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.rand(4, 1, 4, 4)
    with torch.no_grad():
        before = model(x)
    PerturbationBiasMethod(eps_ap=0.1, fold_at_end=False).setup(model, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).requires_grad
