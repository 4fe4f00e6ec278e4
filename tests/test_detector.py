"""Detector-assisted training: the head over every architecture's feature maps, the two-stage step, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import digits_config, saved_model, write_test_store
from torch.utils.data import DataLoader, TensorDataset

from advpipe.batch import Batch
from advpipe.config import OptimConfig, SamplerConfig
from advpipe.errors import ConfigError, ModelError, StoreError
from advpipe.models import ARCHITECTURES, build_model, model_fingerprint
from advpipe.sampler.mapstyle import make_loader
from advpipe.trainers.detector import DetectorHead, DetectorMethod
from advpipe.trainers.loop import StepContext, fit

SMALL_HEAD = {"dim": 16, "heads": 2, "layers": 2, "max_grid": 4}


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here on one thread."""


checkpoint = saved_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_output_shapes_for_every_architecture(arch: str) -> None:
    for size in (16, 20):
        model = build_model(arch, 10, (3, size, size)).eval()
        with torch.no_grad():
            maps = model.features(torch.rand(2, 3, size, size))
            for levels in ("low", "full"):
                head = DetectorHead.from_maps(maps, levels, **SMALL_HEAD)
                logits, feature = head(maps)
                count = 1 if levels == "low" else len(maps)
                assert logits.shape == (2, 2) and feature.shape == (2, 16), (arch, size, levels)
                assert head.levels[0] == 0 and sorted(head.levels) == list(range(count))
                # One position per token of every level: at most max_grid (4) tokens along a side.
                assert head.positions.shape == (count, 16, 4, 4), (arch, size, levels)
                assert torch.isfinite(logits).all()


def test_positions_are_sized_from_the_maps_and_other_input_sizes_still_work() -> None:
    model = build_model("caffe_quick", 10, (3, 16, 16)).eval()  # shallow map: half the input size
    with torch.no_grad():
        small, large = model.features(torch.rand(2, 3, 16, 16)), model.features(torch.rand(3, 3, 20, 20))
        head = DetectorHead.from_maps(small, "full", dim=16, heads=2, max_grid=8)
        assert head.positions.shape == (3, 16, 8, 8)  # 8x8 shallow map, one token per position
        assert DetectorHead.from_maps(large, "full", dim=16, heads=2, max_grid=8).positions.shape == (3, 16, 5, 5)
        logits, feature = head(large)  # 10x10 shallow map -> 5x5 grid, positions interpolated
    assert logits.shape == (3, 2) and feature.shape == (3, 16)


def store_loader(tmp_path: Path, ratio: float = 0.5):
    store = tmp_path / "store"
    write_test_store(store, count=48)
    config = SamplerConfig(ratio=ratio, batch_size=16, seed=0)
    return make_loader(store, "train", config), ["clean", "noise", "tiny"]


def test_P_is_bit_identical_after_training_while_T_and_H_learn(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "mobilenet_v2_cifar")  # batch norm: train mode would move P's statistics
    reference_state = {k: v.clone() for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    loader, names = store_loader(tmp_path)
    method = DetectorMethod({"levels": "full", **SMALL_HEAD}, checkpoint=path, variant_names=names)
    head_before = {k: v.clone() for k, v in method.head.state_dict().items()}
    torch.manual_seed(1)
    target = build_model("mobilenet_v2_cifar", 10, (3, 8, 8))
    target_before = model_fingerprint(target)

    history = fit(target, method, loader, optim=OptimConfig(epochs=2, optimizer="adam", lr=1e-3), progress=False)

    reference = method.modules()["reference"]
    after = reference.state_dict()
    assert after.keys() == reference_state.keys()
    assert all(torch.equal(after[k], reference_state[k]) for k in after)  # weights and BN statistics
    assert model_fingerprint(target) != target_before
    assert any(not torch.equal(v, head_before[k]) for k, v in method.head.state_dict().items())
    assert not any(p.requires_grad for p in reference.parameters())
    for record in history:
        assert 0.0 <= record["train_det_acc"] <= 1.0 and record["train_det_loss"] > 0
        assert 0.0 < record["train_adv_fraction"] < 1.0
    assert set(method.optimizers()) == {"detector"} and set(method.modules()) == {"reference", "detector"}


def test_stage_two_trains_T_through_the_frozen_head_after_stage_one_trained_the_head(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "caffe_quick")
    method = DetectorMethod({"levels": "low", "alpha": 0.0, "beta": 1.0, **SMALL_HEAD}, checkpoint=path,
                            variant_names=["clean", "fgsm"])
    target = build_model("caffe_quick", 10, (3, 8, 8))
    method.setup(target, torch.device("cpu"))
    head_before = [p.detach().clone() for p in method.head.parameters()]
    batch = Batch(x=torch.rand(8, 3, 8, 8), y=torch.arange(8), variant=torch.tensor([0, 1] * 4),
                  index=torch.arange(8))
    optimizer = torch.optim.SGD(method.parameters(target), lr=0.1)
    loss, metrics = method.training_step(target, batch, StepContext(0, 1, 0, 0, torch.device("cpu"), optimizer))
    # Stage 1 stepped H (its own optimiser) and left no gradient behind.
    assert any(not torch.equal(p, q) for p, q in zip(method.head.parameters(), head_before, strict=True))
    loss.backward()
    # Stage 2: only T gets gradients, and with alpha = 0 they come from the feature-matching term alone.
    assert all(p.grad is None for p in method.head.parameters())
    assert loss.item() == pytest.approx(metrics["match"]) and metrics["match"] > 0
    shallow = target.stages[0][0].weight.grad
    assert shallow is not None and shallow.abs().sum() > 0
    assert target.head[-1].weight.grad is None or target.head[-1].weight.grad.abs().sum() == 0  # no CE term
    assert {p for p in method.parameters(target)} == set(target.parameters())  # the loop's optimiser: T only


def noisy_pairs(count: int = 256, seed: int = 0) -> TensorDataset:
    """Smooth 8x8 grey images; odd rows carry strong sign noise (the 'adversarial' variant)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 2, 2, generator=generator)
    x = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    variant = torch.arange(count) % 2
    noise = 0.3 * torch.sign(torch.randn(count, 1, 8, 8, generator=generator))
    x = torch.where(variant[:, None, None, None] == 1, (x + noise).clamp(0, 1), x)
    return TensorDataset(x, torch.randint(0, 10, (count,), generator=generator), torch.arange(count), variant)


def as_batch(items) -> Batch:
    x, y, index, variant = (torch.stack(column) for column in zip(*items, strict=True))
    return Batch(x=x, y=y, variant=variant, index=index)


def test_detector_head_learns_to_tell_noisy_from_clean(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    method = DetectorMethod({"levels": "full", **SMALL_HEAD, "detector_lr": 3e-3}, checkpoint=path,
                            variant_names=["clean", "gaussian"])
    loader = DataLoader(noisy_pairs(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=as_batch)
    history = fit(build_model("lenet", 10, (1, 8, 8)), method, loader,
                  optim=OptimConfig(epochs=3, optimizer="adam", lr=1e-3), progress=False)
    assert history[0]["train_det_acc"] < 0.9
    assert history[-1]["train_det_acc"] >= 0.95


def test_built_from_the_config_with_the_papers_adversarial_ratio(tmp_path: Path) -> None:
    from advpipe.config import MethodConfig
    from advpipe.trainers.registry import MethodContext, build_method

    path = checkpoint(tmp_path, "lenet", shape=(1, 8, 8))
    context = MethodContext(variant_names=["clean", "fgsm", "b2"], variant_kinds={"fgsm": "attack", "b2": "shift"},
                            checkpoint=path, arch="lenet", num_classes=10, input_shape=(1, 8, 8))
    method = build_method("detector", MethodConfig.model_validate({"levels": "low", "ratio": 0.25, **SMALL_HEAD}),
                          context)
    assert isinstance(method, DetectorMethod) and method.head.levels == (0,)
    sampler = method.sampler_config(method.default_data, SamplerConfig(), ["fgsm"])
    assert sampler.ratio.lo == sampler.ratio.hi == 0.25 and set(sampler.weights) == {"fgsm"}
    with pytest.raises(ModelError, match="has 10 classes but the data/model has 3"):
        build_method("detector", MethodConfig(), MethodContext(**{**context.__dict__, "num_classes": 3}))


# ------------------------------------------------------------------------------- the sampler it draws from


def detector_config(root: Path, model: Path, sampler: dict, **methods: dict):
    """A run config over a test store (variants noise and tiny, 48 training images of 3x8x8) at root/store."""
    from advpipe.config import config_from_dict

    raw = digits_config(root, checkpoint=model)
    raw["sampler"] = sampler
    raw["train"] = {"epochs": 2, "batch_size": 8, "optimizer": "adam", "lr": 1e-3, "tensorboard": False,
                    "runs_dir": str(root / "runs")}
    raw["methods"] = methods
    return config_from_dict(raw)


def recorded_training(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every batch the detector method trains on, with the policy of the loader it came from."""
    seen: list = []
    original = DetectorMethod.training_step

    def recording(self, model, batch, ctx):
        seen.append((batch.variant.clone(), self.loader.policy))
        return original(self, model, batch, ctx)

    monkeypatch.setattr(DetectorMethod, "training_step", recording)
    return seen


def test_detector_trained_from_a_config_draws_its_sampler_section_or_the_authors_fixed_mix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21 item 2: the paper's dynamic bounded ranges by default, like `dynamic`; `ratio` gives the fixed mix."""
    from advpipe.trainers.run import train

    write_test_store(tmp_path / "store", count=48)
    sampler = {"ratio": [0.05, 0.95], "redraw": "batch", "weights": {"noise": [1.0, 3.0], "tiny": [0.5, 1.0]}}
    config = detector_config(tmp_path, checkpoint(tmp_path, "lenet"), sampler,
                             detector={"levels": "low", **SMALL_HEAD},
                             detector_fixed={"method": "detector", "ratio": 0.5, "levels": "low", **SMALL_HEAD})
    seen = recorded_training(monkeypatch)
    train(config, "detector", progress=False)
    paper, seen[:] = list(seen), []
    train(config, "detector_fixed", progress=False)
    fixed = list(seen)
    assert len(paper) == len(fixed) == 2 * 6  # 2 epochs of 48 images in batches of 8

    def drawn(sampler_config: SamplerConfig) -> list:
        """What a loader over the store under this policy yields in the run's two epochs."""
        reference = make_loader(tmp_path / "store", "train", sampler_config, batch_size=8)
        return [batch.variant for _ in range(2) for batch in reference]

    # Default: exactly the batches of the config's sampler section, whose ranges the run's policy holds.
    assert all(torch.equal(got, want) for (got, _), want in zip(paper, drawn(config.sampler), strict=True))
    policy = paper[0][1]
    assert (policy.ratio.lo, policy.ratio.hi) == (0.05, 0.95) and policy.redraw == "batch"
    assert {name: (r.lo, r.hi) for name, r in zip(policy.names, policy.ranges, strict=True)} == {
        "noise": (1.0, 3.0), "tiny": (0.5, 1.0)}
    ratios, _ = policy.draw(0, range(6))
    assert ((ratios >= 0.05) & (ratios <= 0.95)).all() and ratios.max() - ratios.min() > 0.3  # redrawn per batch
    shares = [float((variant > 0).float().mean()) for variant, _ in paper]
    assert max(shares) - min(shares) >= 0.5  # e.g. 1 of 8 and 6 of 8 adversarial
    # `ratio: 0.5`: the authors' fixed mix, half of each batch drawn uniformly from the attacks, whatever the section.
    uniform = SamplerConfig(ratio=0.5, weights={"noise": 1.0, "tiny": 1.0}, redraw="batch")
    assert all(torch.equal(got, want) for (got, _), want in zip(fixed, drawn(uniform), strict=True))
    policy = fixed[0][1]
    assert (policy.ratio.lo, policy.ratio.hi) == (0.5, 0.5)
    assert [(r.lo, r.hi) for r in policy.ranges] == [(1.0, 1.0), (1.0, 1.0)]
    assert set(policy.draw(0, range(6))[0].tolist()) == {0.5}


def test_cifar10_config_runs_the_detector_on_the_papers_sampler_and_on_the_authors_fixed_mix(tmp_path: Path) -> None:
    from advpipe.config import load_config
    from advpipe.trainers.registry import method_name, validate_method

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10_detector.yaml")
    attacks = list(config.variants)
    assert len(attacks) == 6
    small = checkpoint(tmp_path, "lenet")  # sampler_config reads only the parameters: any P will do
    policies = {}
    for name, entry in config.methods.items():
        if method_name(name, entry) == "detector":
            params = validate_method(name, entry).model_copy(update={"checkpoint": small})
            method = DetectorMethod(params, variant_names=["clean", *attacks])
            policies[name] = method.sampler_config(entry.data or method.default_data, config.sampler, attacks)
    assert set(policies) == {"detector", "detector_dynamic"}
    paper, authors = policies["detector_dynamic"], policies["detector"]
    assert paper == config.sampler and paper.redraw == "batch"  # the paper's row: the bounded ranges, redrawn
    assert paper.ratio.lo < 0.5 < paper.ratio.hi
    assert set(paper.weights) == set(attacks) and all(r.lo < r.hi for r in paper.weights.values())
    assert (authors.ratio.lo, authors.ratio.hi) == (0.5, 0.5)  # the authors' code: fixed ratio, equal weights
    assert {name: (r.lo, r.hi) for name, r in authors.weights.items()} == {name: (1.0, 1.0) for name in attacks}


def test_detector_feeds_the_adaptive_sampler_its_per_variant_error_like_dynamic(tmp_path: Path) -> None:
    from advpipe.trainers.run import train

    write_test_store(tmp_path / "store", count=48)
    sampler = {"ratio": [0.4, 0.6], "redraw": "batch", "adaptive": True,
               "weights": {"noise": [0.5, 2.0], "tiny": [0.5, 2.0]}}
    config = detector_config(tmp_path, checkpoint(tmp_path, "lenet"), sampler, detector={"levels": "low", **SMALL_HEAD})
    history = train(config, "detector", progress=False).history
    for record in history:
        assert set(record["adaptive_errors"]) == {"noise", "tiny"}
        assert all(0.0 <= error <= 1.0 for error in record["adaptive_errors"].values())


# ------------------------------------------------------------------------------------------ the detector


def digits_variants(model, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every digits image (16x16) of a split: clean, FGSM at eps 0.1 against `model`, Gaussian noise sigma 0.1."""
    from advpipe.config import SourceConfig
    from advpipe.datasets import load_source

    source = load_source(SourceConfig(kind="digits", image_size=16), split)
    x = torch.from_numpy(source.read(range(len(source))).copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(source.labels.copy()).long()
    x_grad = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x_grad), y).backward()
    fgsm = (x + 0.1 * x_grad.grad.sign()).clamp(0, 1)
    noise = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    return x, y, fgsm, noise


def test_detector_head_on_a_trained_lenet_tells_clean_from_adversarial_inputs(digits_model: Path) -> None:
    """Issue 21 item 7: on a trained LeNet's maps (no BatchNorm) the head learnt nothing in the digits run's
    number of steps and flagged almost every input one way (clean 6%, adversarial 98%)."""
    from advpipe.models import load_checkpoint

    reference, _ = load_checkpoint(digits_model)
    x, y, fgsm, noise = digits_variants(reference.eval(), "train")
    # Half of the images clean, a quarter FGSM, a quarter noise: the authors' fixed mix at ratio 0.5.
    variant = torch.arange(len(x)) % 4
    images = torch.where((variant == 1)[:, None, None, None], fgsm, torch.where(
        (variant == 3)[:, None, None, None], noise, x))
    variant = torch.where(variant % 2 == 1, (variant + 1) // 2, torch.zeros_like(variant))  # 0 clean, 1 fgsm, 2 noise
    loader = DataLoader(TensorDataset(images, y, torch.arange(len(x)), variant), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0), collate_fn=as_batch)
    torch.manual_seed(0)
    method = DetectorMethod({"levels": "low", "max_grid": 4}, checkpoint=digits_model,
                            variant_names=["clean", "fgsm", "gaussian"])
    fit(build_model("lenet", 10, (1, 16, 16)), method, loader,
        optim=OptimConfig(epochs=6, optimizer="adam", lr=0.002, weight_decay=0.0, schedule="cosine"), progress=False)

    x, _, fgsm, noise = digits_variants(reference, "test")
    head = method.head.eval()
    with torch.no_grad():
        flagged = {name: head(reference.features(images))[0].argmax(dim=1).float().mean().item()
                   for name, images in {"clean": x, "fgsm": fgsm, "noise": noise}.items()}
    clean_accuracy, adversarial_accuracy = 1 - flagged["clean"], (flagged["fgsm"] + flagged["noise"]) / 2
    assert clean_accuracy >= 0.8 and adversarial_accuracy >= 0.8, flagged
    # H's learning rate followed T's cosine schedule down (last step: 1e-3 * (1 + cos(pi * 137/138)) / 2).
    assert method.head_optimizer.param_groups[0]["lr"] < 1e-6


def test_detector_loss_weighs_clean_and_adversarial_images_equally_in_a_lopsided_batch(tmp_path: Path) -> None:
    """With the sampler's share redrawn per batch, plain cross-entropy would teach H each batch's prior."""
    path = checkpoint(tmp_path, "caffe_quick")
    reference = build_model("caffe_quick", 10, (3, 8, 8)).eval()
    with torch.no_grad():
        maps = reference.features(torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    flags = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1])  # one clean image, seven attacks
    for balanced in (True, False):
        torch.manual_seed(0)
        method = DetectorMethod({"levels": "low", "balanced": balanced, **SMALL_HEAD}, checkpoint=path,
                                variant_names=["clean", "fgsm"])
        method.head.train()
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(method.head(maps)[0], flags, reduction="none")
        loss, _ = method._train_head(maps, flags)
        expected = (losses[0] + losses[1:].mean()) / 2 if balanced else losses.mean()
        assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert DetectorMethod({"levels": "low", **SMALL_HEAD}, checkpoint=path,
                          variant_names=["clean", "fgsm"]).params.balanced  # the default


TWO_RANKS = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from advpipe.batch import Batch
    from advpipe.config import OptimConfig
    from advpipe.models import build_model, model_fingerprint
    from advpipe.trainers import distributed
    from advpipe.trainers.calibrater import CalibraterMethod
    from advpipe.trainers.detector import DetectorMethod
    from advpipe.trainers.loop import fit

    torch.set_num_threads(1)
    distributed.init_from_environment(torch.device("cpu"))
    rank, path = dist.get_rank(), sys.argv[1]
    data = torch.Generator().manual_seed(rank)  # each rank trains on other images
    batches = [Batch(x=torch.rand(8, 3, 8, 8, generator=data), y=torch.randint(0, 10, (8,), generator=data),
                     variant=torch.tensor([0, 1] * 4), index=torch.arange(8)) for _ in range(3)]
    torch.manual_seed(rank)  # different initial networks: rank 0's must reach every rank
    target = build_model("caffe_quick", 10, (3, 8, 8))
    detector = DetectorMethod({"dim": 16, "heads": 2, "max_grid": 4}, checkpoint=path, variant_names=["clean", "fgsm"])
    fit(target, detector, batches, optim=OptimConfig(epochs=1, optimizer="adam", lr=1e-2), progress=False)
    calibrater = CalibraterMethod({"variants": ["fgsm"], "lr": 1e-2}, checkpoint=path, variant_names=["clean", "fgsm"])
    fit(build_model("caffe_quick", 10, (3, 8, 8)), calibrater, batches, optim=OptimConfig(epochs=1), progress=False)
    prints = [model_fingerprint(target), model_fingerprint(detector.head), model_fingerprint(calibrater.generator)]
    gathered = [None, None]
    dist.all_gather_object(gathered, prints)
    if rank == 0:
        print("IDENTICAL" if gathered[0] == gathered[1] else f"DIFFERENT {gathered}")
    distributed.shutdown()
""")


@pytest.mark.slow
def test_two_ranks_end_with_identical_target_head_and_calibrater(tmp_path: Path) -> None:
    """The head's inner step and the calibrater's own optimiser stay in lockstep under torchrun."""
    path = checkpoint(tmp_path, "caffe_quick")
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(path)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IDENTICAL" in result.stdout, result.stdout[-2000:]


# ------------------------------------------------------------------------------------------- bad input


def test_checkpoint_of_another_architecture_or_class_count_is_refused(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet")
    with pytest.raises(ModelError, match="holds a 'lenet' model but 'caffe_quick' is expected"):
        DetectorMethod(checkpoint=path, variant_names=["clean", "fgsm"], arch="caffe_quick")
    with pytest.raises(ModelError, match="10 classes but the data/model has 5"):
        DetectorMethod(checkpoint=path, variant_names=["clean", "fgsm"], num_classes=5)
    with pytest.raises(ModelError, match=r"inputs \(C, H, W\) = \(3, 8, 8\)"):
        DetectorMethod(checkpoint=path, variant_names=["clean", "fgsm"], input_shape=(1, 8, 8))
    # The trained model itself is checked before the first step: nothing is trained.
    method = DetectorMethod(SMALL_HEAD, checkpoint=path, variant_names=["clean", "fgsm"])
    other = build_model("lenet", 5, (3, 8, 8))
    before = model_fingerprint(other)
    batches = [Batch(x=torch.rand(4, 3, 8, 8), y=torch.zeros(4, dtype=torch.long),
                     variant=torch.tensor([0, 1, 0, 1]), index=torch.arange(4))]
    with pytest.raises(ModelError, match="10 classes but the data/model has 5"):
        fit(other, method, batches, optim=OptimConfig(epochs=1), progress=False)
    assert model_fingerprint(other) == before


def test_missing_checkpoint_unknown_parameter_and_clean_only_store_are_clear_errors(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, "lenet")
    with pytest.raises(ModelError, match="not found"):
        DetectorMethod(checkpoint=tmp_path / "absent.pt", variant_names=["clean", "fgsm"])
    with pytest.raises(ConfigError, match="needs the clean model P"):
        DetectorMethod(variant_names=["clean", "fgsm"])
    with pytest.raises(ConfigError, match="method 'detector': unknown parameter 'layerz'"):
        DetectorMethod({"layerz": 4}, checkpoint=path, variant_names=["clean", "fgsm"])
    with pytest.raises(ConfigError, match="'layers'"):
        DetectorMethod({"layers": 12}, checkpoint=path, variant_names=["clean", "fgsm"])
    with pytest.raises(ConfigError, match="low_level is 3 but the model has only 3 feature levels"):
        DetectorMethod({"low_level": 3}, checkpoint=path, variant_names=["clean", "fgsm"])
    with pytest.raises(StoreError, match="holds only the clean variant"):
        DetectorMethod(checkpoint=path, variant_names=["clean"])
