"""Evaluation and reports: every measure against a known answer, reproducibility, bad input.

Two models make the answers known. A LeNet whose weights are all zero except the last bias ignores
its input: its accuracy is the frequency of the class it always predicts under every perturbation,
no attack can move it, and its input gradient is blank. `MeanBrightness` classifies a uniform grey
image as class 0 when it is brighter than 0.5: every attack's and noise's effect on it is a shift of
the image's mean, so each accuracy follows from the images' distances to 0.5.
"""

from __future__ import annotations

import colorsys
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import yaml
from conftest import CLASSES, make_arrays, write_test_store
from torch import nn

from advpipe.cli import main
from advpipe.config import EvaluationConfig, config_from_dict
from advpipe.errors import ConfigError, DataError, ModelError, StoreError
from advpipe.models import ModelMeta, build_model, save_checkpoint
from advpipe.stores import SplitArrays, build_store, open_store
from advpipe.trainers import corruptions
from advpipe.trainers.calibrater import Calibrater
from advpipe.trainers.detector import DetectorHead
from advpipe.trainers.evaluate import (
    Subject,
    autoattack_components,
    autoattack_setting,
    evaluate,
    is_standard_autoattack,
    measure,
    renormalise,
    standard_autoattack,
)
from advpipe.trainers.report import name_records, write_report

CONSTANT_CLASS = 3
#: distances of the brightness store's images from the 0.5 boundary, in grey levels: (k + 0.5) / 255
LEVELS = (2, 10, 20, 30, 45, 60, 90, 110)
CHEAP = {
    "fgsm_eps": [0.05, 0.2], "minimal_fgsm_step": 0.1,
    "autoattack": {"eps": 0.1, "images": 12, "iterations": 5, "targets": 2, "square_queries": 20},
    "deepfool_max_iter": 5, "gaussian_sigmas": [0.1, 0.3], "uniform_a": [0.2, 0.5], "noise_copies": 2,
    "severities": [1, 5],
}


# ---------------------------------------------------------------------------------------------- fixtures


def constant_lenet(shape=(3, 8, 8), classes=CLASSES, predicted: int = CONSTANT_CLASS) -> nn.Module:
    """A LeNet that ignores its input: every weight 0, the last bias picks `predicted` (input stays in the graph)."""
    model = build_model("lenet", len(classes), shape)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.head[-1].bias[predicted] = 5.0
    return model


def save(model: nn.Module, path: Path, classes=CLASSES) -> Path:
    save_checkpoint(path, model, classes, {"method": "clean"})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "store"
    write_test_store(path)
    return path


@pytest.fixture(scope="module")
def test_labels(store) -> np.ndarray:
    return open_store(store).split("test").labels


@pytest.fixture(scope="module")
def constant_run(store, tmp_path_factory) -> Path:
    """`advpipe evaluate` of the input-ignoring LeNet with every measure (cheap settings); its output directory."""
    root = tmp_path_factory.mktemp("constant")
    checkpoint = save(constant_lenet(), root / "constant.pt")
    config = write_config(root / "eval.yaml", CHEAP)
    out = root / "out"
    assert main(["evaluate", str(checkpoint), "--store", str(store), "--out", str(out), "--config", str(config),
                 "--device", "cpu"]) == 0
    return out


def write_config(path: Path, evaluation: dict) -> Path:
    path.write_text(yaml.safe_dump({"evaluation": evaluation}))
    return path


class MeanBrightness(nn.Module):
    """logit 0 = 10 (mean - 0.5), logit 1 = -logit 0, the other classes -100."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = 10.0 * (x.flatten(1).mean(dim=1, keepdim=True) - 0.5)
        return torch.cat([margin, -margin, torch.full((len(x), 8), -100.0) + 0.0 * margin], dim=1)


def distances() -> np.ndarray:
    """Each brightness-store image's distance from 0.5 (class 0 images first, then class 1)."""
    return np.array([(k + 0.5) / 255 for k in LEVELS] * 2)


@pytest.fixture(scope="module")
def brightness_store(tmp_path_factory) -> Path:
    """Uniform grey 1x16x16 images: class 0 at 128 + k grey levels, class 1 at 127 - k; a +0.2 brighter variant."""
    values = [128 + k for k in LEVELS] + [127 - k for k in LEVELS]
    images = np.stack([np.full((1, 16, 16), v, dtype=np.uint8) for v in values])
    labels = np.array([0] * len(LEVELS) + [1] * len(LEVELS))
    brighter = np.clip(images / 255 + 0.2, 0, 1).astype(np.float32)
    split = SplitArrays(images=images, labels=labels, variants={"brighter": brighter}, source_fingerprint="grey")
    path = tmp_path_factory.mktemp("grey") / "store"
    build_store(path, {"train": split, "test": split}, class_names=CLASSES, precision="float32", progress=False)
    return path


def brightness_subject() -> Subject:
    meta = ModelMeta(arch="mean-brightness", num_classes=10, class_names=tuple(CLASSES), input_shape=(1, 16, 16),
                     fingerprint="none")
    return Subject(name="brightness", method="test", model=MeanBrightness(), meta=meta, model_path=Path("none"))


def measure_brightness(store: Path, **settings) -> tuple[dict, dict]:
    config = EvaluationConfig.model_validate(settings)
    results, details, _ = measure(brightness_subject(), open_store(store), config, torch.device("cpu"),
                                  progress=False)
    return results, details


# --------------------------------------------------------------------------------- known answers: brightness


def test_fgsm_sweep_and_minimal_fgsm_match_the_distance_to_the_boundary(brightness_store):
    d = distances()
    results, details = measure_brightness(brightness_store, measures=["fgsm", "minimal_fgsm"],
                                          fgsm_eps=[0.03, 0.1, 0.2], minimal_fgsm_step=0.01)
    # FGSM moves every pixel by eps towards the other class: an image survives iff its distance exceeds eps
    assert results["whitebox_fgsm"] == {key: pytest.approx(np.mean(d > eps))
                                        for key, eps in (("0.03", 0.03), ("0.1", 0.1), ("0.2", 0.2))}
    # the minimal step is the first grid point beyond the distance
    steps = np.ceil(d / 0.01) * 0.01
    assert results["minimal_fgsm"]["success_rate"] == 1.0
    assert results["minimal_fgsm"]["blank_gradient_rate"] == 0.0
    assert results["minimal_fgsm"]["mean_linf"] == pytest.approx(steps.mean(), abs=1e-5)
    assert details["minimal_fgsm"]["images"] == len(d)


@pytest.mark.parametrize("component", ["apgd-ce", "apgd-t", "deepfool"])
def test_each_autoattack_component_finds_every_image_inside_the_eps_ball(brightness_store, component):
    results, details = measure_brightness(brightness_store, measures=["autoattack"],
                                          autoattack={"eps": 0.1, "components": [component], "iterations": 10})
    assert results["autoattack"]["accuracy"] == pytest.approx(np.mean(distances() > 0.1))
    assert results["autoattack"]["setting"].startswith("reduced")
    assert details["autoattack"]["largest_perturbation"] <= 0.1 + 1e-6


def test_autoattack_records_what_ran_and_is_never_called_standard_with_deepfool_or_arts_dlr(brightness_store):
    """Issue 21 item 6: ART has no FAB-T (DeepFool stands in) and APGD-T climbs ART's DLR, so even every
    standard setting on the whole split is not standard AutoAttack; the record names each component and loss."""
    config = EvaluationConfig()  # the full defaults: 100 iterations, 9 targets, 5000 queries
    standard, setting = autoattack_setting(config, 10, 359, 359)
    assert standard is False
    assert setting == ("non-standard (L-inf; DeepFool in FAB-T's place; APGD-T on ART's DLR loss, not "
                       "AutoAttack's targeted DLR)")
    ran = autoattack_components(config.autoattack, 10)
    assert [(c["name"], c["loss"]) for c in ran] == [
        ("apgd-ce", "cross-entropy"),
        ("apgd-t", "art-dlr: -(z_t - max_{i!=t} z_i) / (z_pi1 - z_pi3), minimised"),
        ("deepfool", None),
        ("square", "margin")]
    assert ran[2]["in_place_of"] == "fab-t"
    # a measured run records the same in details.autoattack
    results, details = measure_brightness(brightness_store, measures=["autoattack"],
                                          autoattack={"eps": 0.1, "components": ["apgd-ce", "apgd-t"],
                                                      "iterations": 5, "targets": 2})
    assert details["autoattack"]["standard"] is False
    assert [(c["name"], c["loss"], c["iterations"]) for c in details["autoattack"]["components"]] == [
        ("apgd-ce", "cross-entropy", 5), ("apgd-t", ART_DLR, 5)]
    assert details["autoattack"]["components"][1]["targets"] == 2
    assert results["autoattack"]["setting"] == (
        "reduced (L-inf; without FAB-T, Square; 5 APGD iterations; 2 APGD-T targets; APGD-T on ART's DLR loss, "
        "not AutoAttack's targeted DLR)")


ART_DLR = "art-dlr: -(z_t - max_{i!=t} z_i) / (z_pi1 - z_pi3), minimised"
STANDARD = [
    {"name": "apgd-ce", "loss": "cross-entropy", "iterations": 100, "restarts": 1},
    {"name": "apgd-t", "loss": "targeted-dlr: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), maximised",
     "iterations": 100, "restarts": 1, "targets": 9},
    {"name": "fab-t", "loss": None, "iterations": 100, "restarts": 1, "targets": 9},
    {"name": "square", "loss": "margin", "queries": 5000, "restarts": 1, "p_init": 0.8},
]


def test_only_exactly_standard_autoattack_is_standard():
    """Croce & Hein's standard version, written out here, is standard; any one difference is not."""
    assert standard_autoattack(10) == STANDARD
    assert is_standard_autoattack(STANDARD, 10, 359, 359) is True
    assert is_standard_autoattack(STANDARD, 10, 100, 359) is False  # a subset of the test split
    changes = [(0, "iterations", 20), (1, "loss", ART_DLR), (1, "targets", 3), (2, "name", "deepfool"),
               (3, "queries", 500), (3, "loss", "cross-entropy")]
    for index, key, value in changes:
        ran = [dict(component) for component in STANDARD]
        ran[index][key] = value
        assert is_standard_autoattack(ran, 10, 359, 359) is False, (index, key, value)
    assert is_standard_autoattack(STANDARD[:3], 10, 359, 359) is False
    assert is_standard_autoattack(STANDARD[1:] + STANDARD[:1], 10, 359, 359) is False


def test_deepfool_median_l2_is_the_distance_to_the_boundary_with_overshoot(brightness_store):
    results, details = measure_brightness(brightness_store, measures=["deepfool"])
    # 256 pixels each moved by 1.02 d: L2 = 1.02 * 16 * d; the median of 16 is the mean of the 8th and 9th
    ordered = np.sort(distances())
    assert results["deepfool_median_l2"] == pytest.approx(1.02 * 16 * (ordered[7] + ordered[8]) / 2, rel=1e-4)
    assert details["deepfool"]["success_rate"] == 1.0


def test_noise_accuracy_flip_rate_and_uniform_noise(brightness_store):
    d = distances()
    results, _ = measure_brightness(brightness_store, measures=["gaussian_noise", "uniform_noise"],
                                    gaussian_sigmas=[0.01, 0.3], uniform_a=[0.6], noise_copies=20)
    # sigma 0.01 moves a 256-pixel mean by ~0.0006, far less than the smallest distance (0.0098)
    assert results["gaussian_noise"]["0.01"] == 1.0
    assert results["noise_flip_rate"]["0.01"] == 0.0
    # every image is classified correctly, so a flip is exactly an error
    assert 0 < results["gaussian_noise"]["0.3"] < 1
    assert results["noise_flip_rate"]["0.3"] == pytest.approx(1 - results["gaussian_noise"]["0.3"])
    # U(0, 0.6) brightens by 0.3 +- 0.011: class 1 images closer than 0.3 to the boundary cross it
    assert results["uniform_noise"]["0.6"] == pytest.approx(1 - np.mean(d[len(LEVELS):] < 0.3) / 2)


def test_renormalise_maps_each_image_min_max_into_0_1() -> None:
    """The weight-map paper's renormalisation: per image (not per batch, not per pixel), min -> 0 and max -> 1."""
    x = torch.tensor([[[[0.5, 1.2], [0.9, 0.7]]],       # min 0.5, max 1.2
                      [[[0.1, 0.3], [0.2, 0.1]]]])      # min 0.1, max 0.3: renormalised on its own range
    expected = torch.tensor([[[[0.0, 1.0], [4 / 7, 2 / 7]]],
                             [[[0.0, 1.0], [0.5, 0.0]]]])
    torch.testing.assert_close(renormalise(x), expected, rtol=0, atol=1e-6)
    two_channels = torch.tensor([[[[0.2, 0.4]], [[0.6, 1.0]]]])  # one range over all channels of the image
    torch.testing.assert_close(renormalise(two_channels), torch.tensor([[[[0.0, 0.25]], [[0.5, 1.0]]]]),
                               rtol=0, atol=1e-6)


class Recording(MeanBrightness):
    """MeanBrightness that keeps every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return super().forward(x)


def noisy_inputs(store: Path, measure_name: str, a: float) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """The noisy batches `measure_name` fed the model (its clean passes left out), the clean images, the results."""
    subject = brightness_subject()
    subject.model = Recording()
    config = EvaluationConfig(measures=(measure_name,), uniform_a=(a,), noise_copies=3)
    results, _, _ = measure(subject, open_store(store), config, torch.device("cpu"), progress=False)
    clean = torch.from_numpy(open_store(store).split("test").read(np.arange(len(LEVELS) * 2), 0))
    fed = [x for x in subject.model.inputs if not torch.equal(x, clean)]
    return fed, clean, results


def test_uniform_noise_renormalised_feeds_min_max_renormalised_images_and_clipped_feeds_clipped(brightness_store):
    """Issue 21 item 4: the paper's form (renormalised) and clipping are two measures, each feeding its own inputs."""
    fed, clean, results = noisy_inputs(brightness_store, "uniform_noise_renormalised", 0.6)
    assert len(fed) == 3 and set(results) >= {"uniform_noise_renormalised"} and "uniform_noise" not in results
    for x in fed:
        flat = x.flatten(1)
        assert torch.all(flat.min(dim=1).values == 0.0) and torch.all(flat.max(dim=1).values == 1.0)
        # only the one brightest noisy pixel reaches 1: nothing saturates, as clipping would make it
        assert torch.all((flat == 1.0).sum(dim=1) == 1)
    fed, clean, results = noisy_inputs(brightness_store, "uniform_noise", 0.6)
    assert len(fed) == 3 and "uniform_noise_renormalised" not in results
    for x in fed:
        assert torch.all(x >= clean) and torch.all(x <= torch.clamp(clean + 0.6, max=1.0))
        assert torch.all(x.flatten(1).min(dim=1).values > 0)  # clipped images keep their grey level
    brightest = clean.flatten(1).mean(dim=1).argmax()
    assert torch.mean((fed[0][brightest] == 1.0).float()) > 0.5  # the brightest (0.93) saturates at 1 mostly


def test_weight_map_configs_report_the_papers_uniform_noise() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("digits_weight_map", "cifar10_weight_map"):
        config = config_from_dict(yaml.safe_load((root / f"{name}.yaml").read_text()), name)
        assert "uniform_noise_renormalised" in config.evaluation.measures, name


def test_a_model_wrong_on_every_image_has_no_flip_rate(brightness_store):
    class Swapped(MeanBrightness):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[:, [1, 0, *range(2, 10)]]

    subject = brightness_subject()
    subject.model = Swapped()
    config = EvaluationConfig(measures=("gaussian_noise",), gaussian_sigmas=(0.01,), noise_copies=2)
    results, _, _ = measure(subject, open_store(brightness_store), config, torch.device("cpu"), progress=False)
    assert results["clean_accuracy"] == 0.0
    assert results["gaussian_noise"] == {"0.01": 0.0} and results["noise_flip_rate"] == {"0.01": None}


class FirstPixel(nn.Module):
    """Like MeanBrightness but reads one pixel, so that every random draw can change its answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = 10.0 * (x[:, 0, 0, :1] - 0.5)
        return torch.cat([margin, -margin, torch.full((len(x), 8), -100.0) + 0.0 * margin], dim=1)


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory) -> Path:
    """64 uniform grey 1x16x16 images of random levels, labelled 0 when brighter than 0.5."""
    values = np.random.default_rng(0).choice([v for v in range(60, 196) if v not in (127, 128)], 64)
    images = np.stack([np.full((1, 16, 16), v, dtype=np.uint8) for v in values])
    split = SplitArrays(images=images, labels=(values < 128).astype(np.int64), source_fingerprint="pixels")
    path = tmp_path_factory.mktemp("pixels") / "store"
    build_store(path, {"train": split, "test": split}, class_names=CLASSES, progress=False)
    return path


def test_random_measures_repeat_exactly_and_follow_the_seed(pixel_store):
    """Noise, random corruptions and Square's draws are the same for the same seed, and other for another."""
    subject = brightness_subject()
    subject.model = FirstPixel()
    settings = {"measures": ["gaussian_noise", "uniform_noise", "corruptions", "autoattack"],
                "gaussian_sigmas": [0.3], "uniform_a": [0.4], "noise_copies": 3, "severities": [5],
                "corruptions": ["gaussian_noise", "shot_noise", "impulse_noise"],
                "autoattack": {"eps": 0.1, "components": ["square"], "square_queries": 30}}

    def run(seed: int) -> dict:
        config = EvaluationConfig.model_validate({**settings, "seed": seed})
        return measure(subject, open_store(pixel_store), config, torch.device("cpu"), progress=False)[0]

    first, second, third, other = run(0), run(0), run(0), run(1)
    assert first == second == third
    for key in ("gaussian_noise", "noise_flip_rate", "uniform_noise", "autoattack"):
        assert first[key] != other[key]
    for name in settings["corruptions"]:
        assert first["corruptions"][name] != other["corruptions"][name]


def test_corruptions_and_stored_variants_on_uniform_images(brightness_store):
    d1 = distances()[len(LEVELS):]
    results, details = measure_brightness(
        brightness_store, measures=["variants", "corruptions"],
        corruptions=["brightness", "contrast", "pixelate", "defocus_blur", "gaussian_blur"])
    assert results["clean_accuracy"] == 1.0
    assert results["variant_accuracy"] == {"brighter": pytest.approx(1 - np.mean(d1 < 0.2) / 2)}
    shifts = (0.05, 0.1, 0.15, 0.2, 0.3)  # CIFAR-10-C's brightness severities
    assert results["corruptions"]["brightness"] == {str(s): pytest.approx(1 - np.mean(d1 < shifts[s - 1]) / 2)
                                                   for s in range(1, 6)}
    for unchanged in ("contrast", "pixelate", "defocus_blur", "gaussian_blur"):  # a flat image stays flat
        assert results["corruptions"][unchanged] == {str(s): 1.0 for s in range(1, 6)}
    assert details["corruptions"]["mean"]["contrast"] == 1.0


# ------------------------------------------------------------------ known answers: a model that ignores input


def test_a_model_that_ignores_its_input_scores_the_class_frequency_everywhere(constant_run, test_labels):
    frequency = float(np.mean(test_labels == CONSTANT_CLASS))
    out = constant_run
    record = json.loads((out / "evaluation.json").read_text())
    r = record["results"]
    assert r["clean_accuracy"] == pytest.approx(frequency)
    levels = [r["variant_accuracy"], r["whitebox_fgsm"], r["gaussian_noise"], r["uniform_noise"],
              *r["corruptions"].values()]
    for values in levels:
        assert all(value == pytest.approx(frequency) for value in values.values())
    assert set(r["variant_accuracy"]) == {"noise", "tiny"}
    assert set(r["corruptions"]) == set(corruptions.SEVERITIES)
    assert r["minimal_fgsm"] == {"success_rate": 0.0, "mean_linf": None, "blank_gradient_rate": 1.0}
    assert r["autoattack"]["accuracy"] == pytest.approx(
        float(np.mean(test_labels[_autoattack_images(record)] == CONSTANT_CLASS)))
    assert r["deepfool_median_l2"] is None and record["details"]["deepfool"]["success_rate"] == 0.0
    assert set(r["noise_flip_rate"].values()) == {0.0}
    assert record["model"]["fingerprints"]["model"] and record["store"]["fingerprint"]
    assert record["libraries"]["torch"] == metadata.version("torch") and record["wall_time_s"]["total"] > 0
    for name in ("evaluation.md", "accuracy_vs_eps.png", "accuracy_vs_noise.png", "variant_accuracy.png",
                 "corruptions.png"):
        assert (out / name).stat().st_size > 0
    assert "| constant | clean |" in (out / "evaluation.md").read_text()


def _autoattack_images(record: dict) -> np.ndarray:
    """The AutoAttack subset: the first `images` of the seeded permutation (evaluate's own rule)."""
    count = record["details"]["test_images"]
    order = np.random.default_rng([record["config"]["seed"], count]).permutation(count)
    return np.sort(order[:record["config"]["autoattack"]["images"]])


def test_same_checkpoint_and_store_give_the_same_numbers_twice(store, tmp_path):
    torch.manual_seed(0)
    checkpoint = save(build_model("lenet", 10, (3, 8, 8)), tmp_path / "random.pt")
    config = EvaluationConfig.model_validate(CHEAP)
    first = evaluate(checkpoint, store, config=config, out=tmp_path / "a", device="cpu", progress=False).record
    second = evaluate(checkpoint, store, config=config, out=tmp_path / "b", device="cpu", progress=False).record
    assert first["results"] == second["results"]
    assert first["details"] == second["details"]
    assert json.loads((tmp_path / "a" / "evaluation.json").read_text())["results"] == first["results"]


# ------------------------------------------------------------------------------------ method run directories


def write_run(run_dir: Path, model: nn.Module, method: str, params: dict, modules: dict) -> Path:
    run_dir.mkdir(parents=True)
    save_checkpoint(run_dir / "model.pt", model, CLASSES, {"method": method})
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "method": method, "entry": method,
                                                  "params": params, "fingerprint": "run"}))
    torch.save({"method_modules": {k: v.state_dict() for k, v in modules.items()}}, run_dir / "checkpoint.pt")
    return run_dir


def test_calibrater_run_compares_the_frozen_model_alone_and_with_its_calibrater(store, test_labels, tmp_path):
    torch.manual_seed(1)
    model = build_model("lenet", 10, (3, 8, 8)).eval()
    generator = Calibrater(3, 8, blocks=1)
    with torch.no_grad():  # tanh(-20) = -1: x * (1 + tanh) blacks every image out
        generator.up[-1].bias.fill_(-20.0)
    run = write_run(tmp_path / "calibrater", model, "calibrater", {"variants": ["noise"]}, {"calibrater": generator})
    config = EvaluationConfig(measures=("variants", "calibrated"))
    record = evaluate(run, store, config=config, device="cpu", progress=False).record
    split = open_store(store).split("test")
    with torch.no_grad():
        black = int(model(torch.zeros(1, 3, 8, 8)).argmax())
        alone = {name: float((model(torch.from_numpy(split.read(np.arange(len(split)), vid))).argmax(1).numpy()
                              == test_labels).mean()) for vid, name in enumerate(["clean", "noise"])}
    blacked = pytest.approx(float(np.mean(test_labels == black)))
    assert record["results"]["calibrated"] == {name: {"alone": pytest.approx(alone[name]), "with_calibrater": blacked}
                                               for name in ("clean", "noise")}
    assert record["results"]["clean_accuracy"] == blacked  # a calibrater run is evaluated as f behind G
    assert record["model"]["fingerprints"]["calibrater"]
    report = json.loads((write_report([run], tmp_path / "report") / "report.json").read_text())
    assert report["models"]["calibrater"]["calibrated"] == record["results"]["calibrated"]


def test_detector_run_reports_the_heads_clean_and_adversarial_accuracy(store, tmp_path):
    torch.manual_seed(2)
    reference = build_model("lenet", 10, (3, 8, 8)).eval()
    params = {"dim": 16, "heads": 2, "layers": 1, "max_grid": 4}
    head = DetectorHead.from_maps(reference.features(torch.zeros(1, 3, 8, 8)), "full", 0, dim=16, heads=2, layers=1,
                                  max_grid=4)
    with torch.no_grad():  # a head that calls everything adversarial
        head.classifier.weight.zero_()
        head.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    run = write_run(tmp_path / "detector", build_model("lenet", 10, (3, 8, 8)), "detector", params,
                    {"reference": reference, "detector": head})
    record = evaluate(run, store, config=EvaluationConfig(measures=("detector",)), device="cpu",
                      progress=False).record
    assert record["results"]["detector"] == {"clean_accuracy": 0.0, "adversarial_accuracy": 1.0,
                                             "variants": {"clean": 0.0, "noise": 1.0, "tiny": 1.0}}
    report = json.loads((write_report([run], tmp_path / "report") / "report.json").read_text())
    entry = report["models"]["detector"]
    assert set(entry) == {"method", "clean_accuracy", "detector"} and entry["detector"] == record["results"]["detector"]


# ------------------------------------------------------------------------------------------------- reports


def test_report_puts_runs_side_by_side_in_the_documented_shape(store, constant_run, tmp_path):
    other = tmp_path / "random"
    save(build_model("lenet", 10, (3, 8, 8)), tmp_path / "random.pt")
    config = write_config(tmp_path / "eval.yaml", {"measures": ["variants", "fgsm"], "fgsm_eps": [0.05]})
    assert main(["evaluate", str(tmp_path / "random.pt"), "--store", str(store), "--out", str(other),
                 "--config", str(config), "--device", "cpu"]) == 0
    out = tmp_path / "report"
    assert main(["report", str(constant_run), str(other), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["models"] and set(report["models"]) == {"constant", "random"}
    entry = report["models"]["constant"]
    assert set(entry) == {"method", "clean_accuracy", "variant_accuracy", "whitebox_fgsm", "minimal_fgsm",
                          "autoattack", "deepfool_median_l2", "gaussian_noise", "noise_flip_rate", "uniform_noise",
                          "uniform_noise_renormalised", "corruptions"}
    assert set(entry["minimal_fgsm"]) == {"success_rate", "mean_linf", "blank_gradient_rate"}
    assert set(entry["autoattack"]) == {"eps", "accuracy", "setting"} and entry["autoattack"]["eps"] == 0.1
    assert set(entry["whitebox_fgsm"]) == {"0.05", "0.2"} and set(entry["corruptions"]) == set(corruptions.SEVERITIES)
    assert entry["corruptions"]["contrast"].keys() == {"1", "5"}
    assert set(report["models"]["random"]) == {"method", "clean_accuracy", "variant_accuracy", "whitebox_fgsm"}
    markdown = (out / "report.md").read_text()
    assert "| constant |" in markdown and "| random |" in markdown and "reduced" in markdown
    assert "different settings" in markdown
    for plot in ("accuracy_vs_eps.png", "accuracy_vs_noise.png", "variant_accuracy.png", "corruptions.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_runs_evaluated_on_different_data(store, tmp_path):
    other = tmp_path / "other-store"
    build_store(other, {"test": make_arrays(20, seed=7)}, class_names=CLASSES, progress=False)
    config = EvaluationConfig(measures=("variants",))
    checkpoint = save(constant_lenet(), tmp_path / "model.pt")
    first = evaluate(checkpoint, store, config=config, out=tmp_path / "a", device="cpu", progress=False).out
    second = evaluate(checkpoint, other, config=config, out=tmp_path / "b", device="cpu", progress=False).out
    with pytest.raises(DataError, match="different test data"):
        write_report([first, second], tmp_path / "report")
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())
    with pytest.raises(DataError, match="no evaluation.json"):
        write_report([first, tmp_path], tmp_path / "report")


def test_runs_sharing_a_name_are_told_apart_by_their_directories():
    def record(name: str, target: str, path: str) -> dict:
        return {"name": name, "target": target, "_path": path}

    same_name = [record("clean", "runs/a/clean", "runs/a/clean/evaluation/evaluation.json"),
                 record("clean", "runs/b/clean", "runs/b/clean/evaluation/evaluation.json")]
    assert list(name_records(same_name)) == ["a/clean", "b/clean"]
    same_model = [record("model", "m.pt", "out/x/evaluation.json"), record("model", "m.pt", "out/y/evaluation.json")]
    assert list(name_records(same_model)) == ["model @ x", "model @ y"]
    with pytest.raises(DataError, match="given twice"):
        name_records([same_model[0], same_model[0]])


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("model", "classes", "message"), [
    (lambda: build_model("lenet", 5, (3, 8, 8)), CLASSES[:5], "5 classes"),
    (lambda: build_model("lenet", 10, (1, 8, 8)), CLASSES, r"inputs \(C, H, W\) = \(1, 8, 8\)"),
    (lambda: build_model("lenet", 10, (3, 8, 8)), [f"k{i}" for i in range(10)], "classes"),
])
def test_a_checkpoint_that_does_not_fit_the_store_is_refused_before_anything_is_written(store, tmp_path, model,
                                                                                         classes, message):
    checkpoint = save(model(), tmp_path / "model.pt", classes)
    with pytest.raises(ModelError, match=message):
        evaluate(checkpoint, store, out=tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_store_without_a_test_split_is_refused(tmp_path, capsys):
    train_only = tmp_path / "train-only"
    build_store(train_only, {"train": make_arrays(10)}, class_names=CLASSES, progress=False)
    checkpoint = save(constant_lenet(), tmp_path / "model.pt")
    with pytest.raises(StoreError, match="store.splits including test"):
        evaluate(checkpoint, train_only, out=tmp_path / "out", device="cpu", progress=False)
    assert main(["evaluate", str(checkpoint), "--store", str(train_only), "--out", str(tmp_path / "out")]) == 2
    assert "no 'test' split" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unfinished_or_foreign_run_directories_are_refused(store, tmp_path):
    run = write_run(tmp_path / "run", constant_lenet(), "clean", {}, {})
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))
    with pytest.raises(ModelError, match="not finished"):
        evaluate(run, store, device="cpu", progress=False)
    with pytest.raises(ModelError, match="not a finished run directory"):
        evaluate(tmp_path, store, device="cpu", progress=False)
    assert not (run / "evaluation").exists()


@pytest.mark.parametrize(("evaluation", "message"), [
    ({"measures": ["fgsm", "pgd"]}, "evaluation.measures"),
    ({"fgsm_eps": [0.1, 1.5]}, "evaluation.fgsm_eps"),
    ({"minimal_fgsm_step": 0.5, "minimal_fgsm_max": 0.1}, "minimal_fgsm_step"),
    ({"autoattack": {"components": ["fab-t"]}}, "evaluation.autoattack.components"),
    ({"severities": [0]}, "evaluation.severities"),
])
def test_bad_evaluation_settings_name_the_key(evaluation, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"evaluation": evaluation})


# --------------------------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("name", sorted(corruptions.SEVERITIES))
def test_every_corruption_is_seeded_8bit_and_keeps_the_shape(name):
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for severity in range(1, 6):
        first = corruptions.corrupt(x, name, severity, torch.Generator().manual_seed(1))
        again = corruptions.corrupt(x, name, severity, torch.Generator().manual_seed(1))
        assert torch.equal(first, again) and first.shape == x.shape
        assert torch.equal(first, (first * 255).round() / 255) and 0 <= first.min() <= first.max() <= 1
        assert not torch.equal(first, (x * 255).round() / 255)
    grey = corruptions.corrupt(x[:, :1], name, 3, torch.Generator().manual_seed(1))
    assert grey.shape == (4, 1, 8, 8)


def test_gaussian_blur_is_scipys_gaussian_filter():
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    for sigma in corruptions.SEVERITIES["gaussian_blur"]:
        expected = scipy.ndimage.gaussian_filter(x.numpy().astype(np.float64), sigma=(0, 0, sigma, sigma),
                                                 mode="nearest", truncate=4.0)
        np.testing.assert_allclose(corruptions.gaussian_blur(x, sigma, None).numpy(), expected, atol=1e-6)


def test_defocus_disk_and_brightness_follow_cifar10c():
    box = corruptions.disk(1.5, 0.1)  # radius 1.5 covers the 3x3 square; alias blur 0.1 barely spreads it
    np.testing.assert_allclose(box[1:-1, 1:-1], np.full((3, 3), 1 / 9), atol=1e-4)
    assert corruptions.disk(0.3, 0.4).sum() == pytest.approx(1.0)
    pixels = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 3, 1)
    out = corruptions.brightness(pixels, 0.3, None)
    for column in range(3):
        before = colorsys.rgb_to_hsv(*pixels[0, :, column, 0].tolist())
        after = colorsys.rgb_to_hsv(*out[0, :, column, 0].tolist())
        expected_saturation = before[1] if before[2] > 0 else 0.0
        assert after == pytest.approx((before[0], expected_saturation, min(1.0, before[2] + 0.3)), abs=1e-6)


def test_impulse_noise_replaces_the_asked_share_half_by_salt():
    x = torch.full((50, 3, 32, 32), 0.5)
    out = corruptions.impulse_noise(x, 0.07, torch.Generator().manual_seed(0))
    salt, pepper = (out == 1).float().mean().item(), (out == 0).float().mean().item()
    assert salt + pepper == pytest.approx(0.07, abs=0.003)
    assert salt == pytest.approx(pepper, abs=0.003)
