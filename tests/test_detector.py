"""Detector-assisted training: the head over every architecture's feature maps, the two-stage step, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import saved_model, write_test_store
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
