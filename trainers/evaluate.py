"""Measuring trained models on a store's test split: `advpipe evaluate CHECKPOINT_OR_RUN_DIR --store STORE`.

`variant_accuracy` is the layout of the detector paper's Table 4: a model's accuracy on the
clean test images and on each stored variant of them (transfer from the source model).
`evaluate` measures everything else a user needs to compare training methods (docs/REPORT.md):

- white-box robustness of the model itself: FGSM accuracy over an eps sweep (ART); the BANG
  paper's minimal FGSM (the smallest successful step on a grid, pixels kept in [0, 1]) and the
  share of images whose input gradient is all zeros (then no gradient attack can move them);
  robust accuracy under ART's AutoAttack runner (APGD-CE, APGD-T on ART's DLR loss, DeepFool in
  FAB-T's place, Square: not the standard AutoAttack, and labelled so; which components ran, with
  their losses, is recorded); the median L2 of DeepFool over the correctly classified images;
- noise: Gaussian noise over a sigma sweep with the BANG paper's flip rate, uniform noise in the
  weight-map paper's form (`x + U(0, a)` renormalised into [0, 1] per image, min-max) and clipped
  (`clip(x + U(0, a), 0, 1)`), CIFAR-10-C style corruptions at 5 severities;
- per method: the detector head's clean/adversarial accuracy, and the frozen model alone vs
  with its calibrater on the shifted variants.

Every random draw is seeded from `evaluation.seed` and the measure, so the same checkpoint and
store give the same numbers. Everything is checked (checkpoint against store, test split, run
directory) before anything is computed, and outputs are written only at the end, each atomically.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from advpipe.config import EvaluationConfig, MethodConfig, SamplerConfig
from advpipe.devices import resolve_device
from advpipe.errors import ModelError, StoreError
from advpipe.models import ModelMeta, build_model, load_checkpoint, state_dict_fingerprint
from advpipe.provenance import library_versions
from advpipe.sampler import open_loader
from advpipe.stores import Store, open_store
from advpipe.trainers.corruptions import corrupt
from advpipe.trainers.loop import evaluate as loader_accuracy
from advpipe.trainers.report import EVALUATION_DIR, EVALUATION_FORMAT, write_evaluation

log = logging.getLogger(__name__)

EVAL_BATCH = 512
RUN_FILE, MODEL_FILE, STATE_FILE = "run.json", "model.pt", "checkpoint.pt"
TEST = "test"
CLEAN = "clean"


def variant_accuracy(model: nn.Module, store: Store, split: str = "test", *, device: torch.device | str = "cpu",
                     predict: Callable[[Tensor], Tensor] | None = None,
                     batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Accuracy on the clean images and on every stored variant of `split` (clean first)."""
    device = resolve_device(device)
    model.to(device)
    result = {}
    loader_log = logging.getLogger("advpipe.sampler.loader")
    level = loader_log.level
    loader_log.setLevel(max(level, logging.WARNING))  # one variant per pass: its realised counts say nothing
    try:
        for name in store.variants:
            only = SamplerConfig(ratio=(0.0, 0.0)) if name == "clean" else \
                SamplerConfig(ratio=(1.0, 1.0), weights={name: 1.0})
            loader = open_loader(store.source.location, split, only, reader="map", batch_size=batch_size,
                                 shuffle=False, rank=0, world_size=1, storage_options=store.source.storage_options)
            result[name] = loader_accuracy(model, loader, device, predict=predict)
    finally:
        loader_log.setLevel(level)
    return result


# ---------------------------------------------------------------------------------------- what is evaluated


@dataclass
class Subject:
    """The network evaluated and what it came from; method extras only when a run directory provides them."""

    name: str
    method: str
    model: nn.Module  # what every measure attacks: f, or f behind its calibrater for calibrater runs
    meta: ModelMeta
    model_path: Path
    run: dict[str, Any] | None = None
    base_model: nn.Module | None = None  # calibrater runs: the frozen f alone
    calibrater_fingerprint: str | None = None
    calibrated_variants: tuple[str, ...] = ()
    detector: tuple[nn.Module, nn.Module] | None = None  # (P, head H) of detector runs

    def fingerprints(self) -> dict[str, Any]:
        found = {"model": self.meta.fingerprint}
        if self.calibrater_fingerprint:
            found["calibrater"] = self.calibrater_fingerprint
        if self.run is not None:
            found["run"] = self.run.get("fingerprint")
        return found


def load_subject(target: str | Path) -> Subject:
    """A model checkpoint, or a run directory of `advpipe train` (model.pt, run.json, checkpoint.pt)."""
    target = Path(target)
    if target.is_dir():
        return _load_run(target)
    if not target.exists():
        raise ModelError(f"{target}: no such checkpoint or run directory; give a model checkpoint (.pt) or a run "
                         "directory written by `advpipe train`")
    model, meta = load_checkpoint(target)
    name = target.parent.name if target.name == MODEL_FILE else target.stem
    method = str(meta.training.get("method") or "unknown")
    if method in ("calibrater", "detector"):
        log.warning("%s: a %s model given as a file is evaluated alone; give its run directory to measure the %s "
                    "too", target, method, "calibrater" if method == "calibrater" else "detector head")
    return Subject(name=name, method=method, model=model, meta=meta, model_path=target)


def _load_run(run_dir: Path) -> Subject:
    record_path, model_path = run_dir / RUN_FILE, run_dir / MODEL_FILE
    if not record_path.is_file() or not model_path.is_file():
        raise ModelError(f"{run_dir}: not a finished run directory (it needs {RUN_FILE} and {MODEL_FILE}); "
                         "train it with `advpipe train CONFIG --method NAME`, or give a model checkpoint")
    try:
        run = json.loads(record_path.read_text())
    except ValueError:
        raise ModelError(f"{record_path}: damaged run record (not JSON); retrain the run") from None
    if run.get("status") != "finished":
        raise ModelError(f"{run_dir}: the run is not finished (status {run.get('status')!r}); resume it with "
                         "`advpipe train CONFIG --method NAME --resume` first")
    model, meta = load_checkpoint(model_path)
    method = str(run.get("method") or meta.training.get("method") or "unknown")
    subject = Subject(name=run_dir.name, method=method, model=model, meta=meta, model_path=model_path, run=run)
    if method == "calibrater":
        _attach_calibrater(subject, run_dir)
    elif method == "detector":
        _attach_detector(subject, run_dir)
    return subject


def _method_params(run: dict[str, Any]) -> Any:
    from advpipe.trainers.registry import validate_method

    return validate_method(str(run.get("entry") or run["method"]), MethodConfig.model_validate(run.get("params", {})))


def _method_modules(run_dir: Path) -> dict[str, dict[str, Tensor]]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ModelError(f"{run_dir}: {STATE_FILE} is missing, and it holds the method's own networks; "
                         "retrain the run, or give model.pt alone to evaluate the model without them")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return dict(payload["method_modules"])
    except Exception as exc:  # a damaged file fails inside torch's unpickler in many ways
        raise ModelError(f"{path}: not a readable training checkpoint ({type(exc).__name__}); retrain the run") \
            from None


def _attach_calibrater(subject: Subject, run_dir: Path) -> None:
    """f behind G is what a calibrater run delivers; f alone is kept for the comparison."""
    from advpipe.trainers.calibrater import Calibrater, calibrate

    params = _method_params(subject.run or {})
    state = _method_modules(run_dir).get("calibrater")
    try:
        blocks = len({key.split(".")[1] for key in state if key.startswith("residual.")})
        generator = Calibrater(int(state["down.0.weight"].shape[1]), int(state["down.6.weight"].shape[0]), blocks,
                               params.merge)
        generator.load_state_dict(state)
    except (AttributeError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelError(f"{run_dir}/{STATE_FILE}: holds no calibrater that fits ({str(exc).splitlines()[0]}); "
                         "retrain the run") from None
    generator.eval()
    subject.base_model = subject.model
    subject.model = calibrate(subject.model, generator).eval()
    subject.calibrater_fingerprint = state_dict_fingerprint(generator.state_dict())
    subject.calibrated_variants = tuple(params.variants)


def _attach_detector(subject: Subject, run_dir: Path) -> None:
    """Rebuild P and the head H exactly as the method sized them (from P's feature maps)."""
    from advpipe.trainers.detector import DetectorHead

    p = _method_params(subject.run or {})
    modules = _method_modules(run_dir)
    meta = subject.meta
    try:
        reference = build_model(meta.arch, meta.num_classes, meta.input_shape)
        reference.load_state_dict(modules["reference"])
        reference.eval()
        with torch.no_grad():
            maps = reference.features(torch.zeros(1, *meta.input_shape))
        head = DetectorHead.from_maps(maps, p.levels, p.low_level, dim=p.dim, heads=p.heads, layers=p.layers,
                                      mlp_ratio=p.mlp_ratio, dropout=p.dropout, max_grid=p.max_grid)
        head.load_state_dict(modules["detector"])
    except (KeyError, RuntimeError) as exc:
        raise ModelError(f"{run_dir}/{STATE_FILE}: holds no detector head that fits ({str(exc).splitlines()[0]}); "
                         "retrain the run") from None
    subject.detector = (reference.requires_grad_(False), head.eval().requires_grad_(False))


def check_fits(subject: Subject, store: Store) -> None:
    """The model must take the store's images and name its classes; the store must have a test split."""
    manifest = store.manifest
    if TEST not in manifest.splits:
        raise StoreError(f"{store.path}: store has no '{TEST}' split (it has: {', '.join(manifest.splits)}); "
                         "evaluation needs the test images: generate a store with store.splits including test")
    if manifest.splits[TEST].count == 0:
        raise StoreError(f"{store.path}: the store's test split is empty; generate it with test images")
    meta, classes = subject.meta, list(manifest.class_names)
    if meta.num_classes != len(classes):
        raise ModelError(f"{subject.model_path}: the model has {meta.num_classes} classes but store {store.path} has "
                         f"{len(classes)}; evaluate it on a store of the data it was trained on")
    if tuple(meta.input_shape) != tuple(manifest.image_shape):
        raise ModelError(f"{subject.model_path}: the model takes inputs (C, H, W) = {tuple(meta.input_shape)} but "
                         f"store {store.path} holds {tuple(manifest.image_shape)} images; evaluate it on a store of "
                         "the data it was trained on")
    if list(meta.class_names) != classes:
        raise ModelError(f"{subject.model_path}: the model's classes ({', '.join(meta.class_names[:5])}...) are not "
                         f"the store's ({', '.join(classes[:5])}...); evaluate it on a store of its own data")


# --------------------------------------------------------------------------------------------- the images


@dataclass
class TestImages:
    """A seeded subset of the test split, read in chunks (never the whole split in memory as floats)."""

    store: Store
    indices: np.ndarray  # sorted
    batch_size: int
    device: torch.device
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the seeded permutation

    @classmethod
    def select(cls, store: Store, limit: int | None, seed: int, batch_size: int, device: torch.device) -> TestImages:
        count = store.manifest.splits[TEST].count
        order = np.random.default_rng([seed, count]).permutation(count)
        chosen = np.sort(order[:limit] if limit else order)
        return cls(store, chosen, batch_size, device, order)

    def first(self, limit: int | None) -> TestImages:
        """A smaller seeded subset inside this one (the same images for every model)."""
        if limit is None or limit >= len(self.indices):
            return self
        inside = self.order[np.isin(self.order, self.indices)]
        return TestImages(self.store, np.sort(inside[:limit]), self.batch_size, self.device, self.order)

    def where(self, keep: np.ndarray) -> TestImages:
        return TestImages(self.store, self.indices[keep], self.batch_size, self.device, self.order)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.store.split(TEST).labels[self.indices].astype(np.int64)

    def batches(self, variant: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        split, labels = self.store.split(TEST), self.labels
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            x = torch.from_numpy(split.read(chunk, variant))
            yield x, torch.from_numpy(labels[start:start + self.batch_size])


def predictions(model: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    with torch.no_grad():
        return model(x.to(device)).argmax(dim=1).cpu()


def seed_for(seed: int, *parts: object) -> int:
    """A 31-bit seed for one measure (and level): the same for every run of the same config."""
    words = [int(seed)] + [zlib.crc32(str(part).encode()) for part in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(value: int) -> None:
    """ART draws from numpy's and torch's global generators; each measure starts them afresh."""
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def level_key(value: float) -> str:
    return f"{value:g}"


def share(count: float, total: int) -> float | None:
    return None if total == 0 else float(count) / total


# --------------------------------------------------------------------------------------------- the measures


@dataclass
class Context:
    subject: Subject
    store: Store
    config: EvaluationConfig
    device: torch.device
    images: TestImages
    bar: Any = None

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def classifier(self) -> Any:
        """The model wrapped for ART: inputs in [0, 1], logits out, cross-entropy loss."""
        import contextlib

        from art.estimators.classification import PyTorchClassifier

        manifest = self.store.manifest
        on_gpu = self.device.type == "cuda"
        with torch.cuda.device(self.device) if on_gpu else contextlib.nullcontext():
            return PyTorchClassifier(model=self.subject.model, loss=nn.CrossEntropyLoss(),
                                     input_shape=tuple(manifest.image_shape), nb_classes=len(manifest.class_names),
                                     clip_values=(0.0, 1.0), device_type="gpu" if on_gpu else "cpu")


def measure_variants(ctx: Context) -> dict[str, Any]:
    accuracy = variant_accuracy(ctx.subject.model, ctx.store, TEST, device=ctx.device,
                                batch_size=ctx.config.batch_size)
    ctx.step("variants")
    out: dict[str, Any] = {"clean_accuracy": accuracy[CLEAN],
                           "variant_accuracy": {k: v for k, v in accuracy.items() if k != CLEAN}}
    if ctx.subject.base_model is not None and "calibrated" in ctx.config.measures:
        out["_calibrated_with"] = accuracy
    return out


def measure_clean(ctx: Context) -> dict[str, Any]:
    """Clean accuracy over the whole test split, when the variants are not measured."""
    every = TestImages.select(ctx.store, None, 0, ctx.config.batch_size, ctx.device)
    correct = sum(int((predictions(ctx.subject.model, x, ctx.device) == y).sum()) for x, y in every.batches())
    return {"clean_accuracy": correct / len(every)}


def measure_calibrated(ctx: Context, with_calibrater: dict[str, float] | None) -> dict[str, Any]:
    """f alone vs f with G, on clean, the store's shift variants and the variants G trained on."""
    subject = ctx.subject
    if subject.base_model is None:
        return {}
    kinds = {v.name: getattr(v, "kind", None) for v in ctx.store.manifest.variants}
    names = [n for n in ctx.store.variants
             if n == CLEAN or kinds.get(n) == "shift" or n in subject.calibrated_variants]
    alone = variant_accuracy(subject.base_model, ctx.store, TEST, device=ctx.device,
                             batch_size=ctx.config.batch_size)
    with_g = with_calibrater or variant_accuracy(subject.model, ctx.store, TEST, device=ctx.device,
                                                 batch_size=ctx.config.batch_size)
    ctx.step("calibrated")
    return {"calibrated": {n: {"alone": alone[n], "with_calibrater": with_g[n]} for n in names}}


def measure_detector(ctx: Context) -> dict[str, Any]:
    """The head's clean/adversarial accuracy on P's feature maps (what it was trained on); shifts are skipped."""
    if ctx.subject.detector is None:
        return {}
    reference, head = (module.to(ctx.device) for module in ctx.subject.detector)
    kinds = {v.name: getattr(v, "kind", None) for v in ctx.store.manifest.variants}
    failed = ctx.store.split(TEST).failed()
    per_variant, adversarial = {}, [0, 0]
    for variant_id, name in enumerate(ctx.store.variants):
        if kinds.get(name) == "shift":
            continue
        images = ctx.images.where(~failed[ctx.images.indices, variant_id])  # a failed image holds no attack
        correct = 0
        for x, _ in images.batches(variant_id):
            with torch.no_grad():
                flags = head(reference.features(x.to(ctx.device)))[0].argmax(dim=1).cpu()
            correct += int((flags == int(variant_id > 0)).sum())
        per_variant[name] = share(correct, len(images))
        if variant_id > 0:
            adversarial[0] += correct
            adversarial[1] += len(images)
    ctx.step("detector")
    return {"detector": {"clean_accuracy": per_variant[CLEAN], "adversarial_accuracy": share(*adversarial),
                         "variants": per_variant}}


def measure_fgsm(ctx: Context) -> dict[str, Any]:
    from art.attacks.evasion import FastGradientMethod

    classifier, config = ctx.classifier(), ctx.config
    result = {}
    for eps in config.fgsm_eps:
        seed_everything(seed_for(config.seed, "fgsm", eps))
        attack = FastGradientMethod(classifier, norm=np.inf, eps=eps, eps_step=eps, batch_size=config.batch_size)
        correct = 0
        for x, y in ctx.images.batches():
            adversarial = attack.generate(x.numpy(), y.numpy())
            correct += int((predictions(ctx.subject.model, torch.from_numpy(adversarial), ctx.device) == y).sum())
        result[level_key(eps)] = correct / len(ctx.images)
        ctx.step(f"fgsm eps={eps:g}")
    return {"whitebox_fgsm": result}


def correct_mask(ctx: Context, images: TestImages) -> np.ndarray:
    return np.concatenate([(predictions(ctx.subject.model, x, ctx.device) == y).numpy()
                           for x, y in images.batches()]) if len(images) else np.zeros(0, dtype=bool)


def measure_minimal_fgsm(ctx: Context) -> dict[str, Any]:
    """BANG's measure on the correctly classified images: the smallest eps on the grid whose FGSM step fools
    the model (pixels kept in [0, 1]), its L-inf size, and how many images have an all-zero input gradient."""
    from art.attacks.evasion import FastGradientMethod

    config = ctx.config
    seed_everything(seed_for(config.seed, "minimal_fgsm"))
    classifier = ctx.classifier()
    attack = FastGradientMethod(classifier, norm=np.inf, eps=config.minimal_fgsm_max, eps_step=config.minimal_fgsm_step,
                                minimal=True, batch_size=config.batch_size)
    targets = ctx.images.where(correct_mask(ctx, ctx.images))
    successes, blank, blank_failures, norms = 0, 0, 0, []
    for x, y in targets.batches():
        x_np, y_np = x.numpy(), y.numpy()
        gradient = classifier.loss_gradient(x_np, np.eye(classifier.nb_classes, dtype=np.float32)[y_np])
        is_blank = ~np.any(gradient.reshape(len(x_np), -1) != 0, axis=1)
        adversarial = attack.generate(x_np, y_np)
        fooled = (predictions(ctx.subject.model, torch.from_numpy(adversarial), ctx.device) != y).numpy()
        linf = np.abs(adversarial - x_np).reshape(len(x_np), -1).max(axis=1)
        successes += int(fooled.sum())
        blank += int(is_blank.sum())
        blank_failures += int((is_blank & ~fooled).sum())
        norms.extend(linf[fooled].tolist())
    ctx.step("minimal fgsm")
    total = len(targets)
    return {"minimal_fgsm": {"success_rate": share(successes, total),
                             "mean_linf": float(np.mean(norms)) if norms else None,
                             "blank_gradient_rate": share(blank, total)},
            "_minimal_fgsm": {"images": total, "successes": successes, "blank_gradients": blank,
                              "failures_with_blank_gradient": blank_failures,
                              "eps_step": config.minimal_fgsm_step, "eps_max": config.minimal_fgsm_max}}


#: ART's DLR loss as APGD-T runs it: ART's `difference_logits_ratio` with the target class t as the label,
#: descended (targeted), i.e. maximising (z_t - max_{i != t} z_i) / (z_pi1 - z_pi3); pi sorts the logits.
ART_TARGETED_DLR = "art-dlr: -(z_t - max_{i!=t} z_i) / (z_pi1 - z_pi3), minimised"
#: AutoAttack's targeted DLR (Croce & Hein 2020), ascended: y the true class, t the target.
TARGETED_DLR = "targeted-dlr: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), maximised"


def standard_autoattack(num_classes: int) -> list[dict[str, Any]]:
    """AutoAttack's standard version (Croce & Hein 2020, `version='standard'`), component by component, in the
    shape `autoattack_components` records what ran; a run is standard only when it ran exactly this."""
    targets = min(9, num_classes - 1)
    return [
        {"name": "apgd-ce", "loss": "cross-entropy", "iterations": 100, "restarts": 1},
        {"name": "apgd-t", "loss": TARGETED_DLR, "iterations": 100, "restarts": 1, "targets": targets},
        {"name": "fab-t", "loss": None, "iterations": 100, "restarts": 1, "targets": targets},
        {"name": "square", "loss": "margin", "queries": 5000, "restarts": 1, "p_init": 0.8},
    ]


def autoattack_components(aa: Any, num_classes: int) -> list[dict[str, Any]]:
    """What `measure_autoattack` runs, in order: each component's name, its ART attack, the loss it climbs and
    its settings (`_autoattack_components` builds exactly these)."""
    described = []
    for name in aa.components:
        if name == "apgd-ce":
            described.append({"name": "apgd-ce", "attack": "art.AutoProjectedGradientDescent", "loss": "cross-entropy",
                              "iterations": aa.iterations, "restarts": 1})
        elif name == "apgd-t":
            described.append({"name": "apgd-t", "attack": "art.AutoProjectedGradientDescent (targeted, per target)",
                              "loss": ART_TARGETED_DLR, "iterations": aa.iterations, "restarts": 1,
                              "targets": min(aa.targets, num_classes - 1)})
        elif name == "deepfool":
            described.append({"name": "deepfool", "attack": "art.DeepFool", "loss": None, "iterations": 100,
                              "overshoot": 1e-3, "classes": 10, "in_place_of": "fab-t"})
        else:
            described.append({"name": "square", "attack": "art.SquareAttack", "loss": "margin",
                              "queries": aa.square_queries, "restarts": 1, "p_init": 0.8})
    return described


def is_standard_autoattack(ran: list[dict[str, Any]], num_classes: int, images: int, split_size: int) -> bool:
    """True only for exactly AutoAttack's standard version: APGD-CE, APGD-T on the targeted DLR, FAB-T and
    Square, in that order, at the standard settings, on the whole test split."""
    keys = ("name", "loss", "iterations", "restarts", "targets", "queries", "p_init")
    wanted = [{k: c.get(k) for k in keys} for c in standard_autoattack(num_classes)]
    return images >= split_size and [{k: c.get(k) for k in keys} for c in ran] == wanted


def autoattack_setting(config: EvaluationConfig, num_classes: int, images: int, split_size: int) -> tuple[bool, str]:
    """(standard?, a label naming what differs from the standard setting).

    `reduced (...)` when less was run than the standard version (components, iterations, targets, queries,
    images), `non-standard (...)` when as much was run but by other components or losses; both name every
    difference. advpipe's ART runner is never standard: ART has no FAB-T, and its APGD has no targeted DLR.
    """
    aa = config.autoattack
    ran = autoattack_components(aa, num_classes)
    norm = "L-inf" if aa.norm == "linf" else "L2"
    if is_standard_autoattack(ran, num_classes, images, split_size):
        return True, f"standard ({norm}; APGD-CE, APGD-T, FAB-T, Square)"
    reduced, substituted = [], []
    names = [c["name"] for c in ran]
    missing = [c for c in ("apgd-ce", "apgd-t", "fab-t", "square")
               if c not in names and not (c == "fab-t" and "deepfool" in names)]
    if missing:
        shown_as = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}
        reduced.append("without " + ", ".join(shown_as[m] for m in missing))
    if ("apgd-ce" in names or "apgd-t" in names) and aa.iterations < 100:
        reduced.append(f"{aa.iterations} APGD iterations")
    if "apgd-t" in names and aa.targets < min(9, num_classes - 1):
        reduced.append(f"{aa.targets} APGD-T targets")
    if "square" in names and aa.square_queries < 5000:
        reduced.append(f"{aa.square_queries} Square queries")
    if images < split_size:
        reduced.append(f"{images} of {split_size} test images")
    if "deepfool" in names:
        substituted.append("DeepFool in FAB-T's place")
    if "apgd-t" in names:
        substituted.append("APGD-T on ART's DLR loss, not AutoAttack's targeted DLR")
    label = "reduced" if reduced else "non-standard"
    return False, f"{label} ({norm}; " + "; ".join(reduced + substituted) + ")"


def measure_autoattack(ctx: Context) -> dict[str, Any]:
    """ART's AutoAttack runner: each component attacks only the images still robust; a result counts only
    when it is misclassified and inside the eps ball (ART checks both)."""
    from art.attacks.evasion import AutoAttack

    config, aa = ctx.config, ctx.config.autoattack
    seed_everything(seed_for(config.seed, "autoattack"))
    classifier = ctx.classifier()
    images = ctx.images.first(aa.images)
    norm = np.inf if aa.norm == "linf" else 2
    attack = AutoAttack(classifier, norm=norm, eps=aa.eps, eps_step=2 * aa.eps,
                        attacks=_autoattack_components(classifier, aa, norm, config.batch_size),
                        batch_size=config.batch_size)
    correct, largest = 0, 0.0
    for x, y in images.batches():
        adversarial = attack.generate(x.numpy(), y.numpy())
        correct += int((predictions(ctx.subject.model, torch.from_numpy(adversarial), ctx.device) == y).sum())
        distance = np.linalg.norm((adversarial - x.numpy()).reshape(len(x), -1), ord=norm, axis=1)
        largest = max(largest, float(distance.max()))
    ctx.step("autoattack")
    num_classes = len(ctx.store.manifest.class_names)
    standard, setting = autoattack_setting(config, num_classes, len(images), ctx.store.manifest.splits[TEST].count)
    return {"autoattack": {"eps": aa.eps, "accuracy": correct / len(images), "setting": setting},
            "_autoattack": {"standard": standard, "images": len(images), "norm": aa.norm,
                            "components": autoattack_components(aa, num_classes), "iterations": aa.iterations,
                            "targets": aa.targets, "square_queries": aa.square_queries,
                            "largest_perturbation": largest}}


def _autoattack_components(classifier: Any, aa: Any, norm: float, batch_size: int) -> list[Any]:
    """The components as ART has them (ART has no FAB: DeepFool stands in, as in ART's own default list; its
    APGD has no targeted DLR); `autoattack_components` describes exactly what this builds."""
    from art.attacks.evasion import AutoProjectedGradientDescent, DeepFool, SquareAttack

    built = []
    for name in aa.components:
        if name == "apgd-ce":
            built.append(AutoProjectedGradientDescent(classifier, norm=norm, eps=aa.eps, eps_step=2 * aa.eps,
                                                      max_iter=aa.iterations, nb_random_init=1, batch_size=batch_size,
                                                      loss_type="cross_entropy", verbose=False))
        elif name == "apgd-t":
            built.append(targeted_apgd(classifier, norm=norm, eps=aa.eps, iterations=aa.iterations,
                                       targets=aa.targets, batch_size=batch_size))
        elif name == "deepfool":
            built.append(DeepFool(classifier, max_iter=100, epsilon=1e-3, nb_grads=10, batch_size=batch_size,
                                  verbose=False))
        else:
            built.append(SquareAttack(classifier, norm=norm, eps=aa.eps, max_iter=aa.square_queries, p_init=0.8,
                                      nb_restarts=1, batch_size=batch_size, verbose=False))
    return built


def _targeted_apgd_class() -> type:
    from art.attacks.attack import EvasionAttack
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification.classifier import ClassifierMixin
    from art.estimators.estimator import BaseEstimator

    class TopClassTargetsAttack(EvasionAttack):
        """APGD-T: targeted APGD towards each of an image's `targets` highest other classes in turn
        (AutoAttack's rule), keeping the first success inside the eps ball. Untargeted as a whole, so ART's
        AutoAttack checks its results like any untargeted component. The loss is ART's DLR with the target as
        the label (`ART_TARGETED_DLR`), not AutoAttack's targeted DLR (`TARGETED_DLR`)."""

        attack_params = EvasionAttack.attack_params + ["targets"]
        _estimator_requirements = (BaseEstimator, ClassifierMixin)

        def __init__(self, estimator: Any, *, norm: float, eps: float, iterations: int, targets: int,
                     batch_size: int) -> None:
            super().__init__(estimator=estimator)
            self.norm, self.eps, self.targets, self.batch_size = norm, eps, targets, batch_size
            self.inner = AutoProjectedGradientDescent(estimator, norm=norm, eps=eps, eps_step=2 * eps,
                                                      max_iter=iterations, targeted=True, nb_random_init=1,
                                                      batch_size=batch_size, loss_type="difference_logits_ratio",
                                                      verbose=False)

        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            labels = np.argmax(y, axis=1) if y is not None and y.ndim == 2 else np.asarray(y)
            logits = self.estimator.predict(x, batch_size=self.batch_size)
            ranked = np.argsort(-logits, axis=1, kind="stable")
            others = np.stack([row[row != label] for row, label in zip(ranked, labels, strict=True)])
            out, robust = x.copy(), np.ones(len(x), dtype=bool)
            eye = np.eye(logits.shape[1], dtype=np.float32)
            for k in range(min(self.targets, others.shape[1])):
                active = np.flatnonzero(robust)
                if not len(active):
                    break
                candidate = self.inner.generate(x[active], eye[others[active, k]])
                fooled = self.estimator.predict(candidate, batch_size=self.batch_size).argmax(axis=1) != labels[active]
                size = np.linalg.norm((candidate - x[active]).reshape(len(active), -1), ord=self.norm, axis=1)
                done = fooled & ((1 - 1e-4) * size <= self.eps)
                out[active[done]] = candidate[done]
                robust[active[done]] = False
            return out

    return TopClassTargetsAttack


def targeted_apgd(classifier: Any, **kwargs: Any) -> Any:
    """APGD-T as an ART attack (the class is made on first use: importing ART is slow)."""
    return _targeted_apgd_class()(classifier, **kwargs)


def measure_deepfool(ctx: Context) -> dict[str, Any]:
    """Median L2 of DeepFool (batched PyTorch, ART's algorithm) over the correctly classified images; an image
    DeepFool cannot move across the boundary counts as infinitely far."""
    from advpipe.pipeline.generators.deepfool import deepfool

    config = ctx.config
    seed_everything(seed_for(config.seed, "deepfool"))
    images = ctx.images.first(config.deepfool_images)
    targets = images.where(correct_mask(ctx, images))
    distances = []
    for x, y in targets.batches():
        x = x.to(ctx.device)
        adversarial = deepfool(ctx.subject.model, x, max_iter=config.deepfool_max_iter,
                               overshoot=config.deepfool_overshoot, nb_grads=10, stop_on_overshot=True).detach()
        fooled = predictions(ctx.subject.model, adversarial, ctx.device) != y
        size = (adversarial - x).flatten(1).norm(dim=1).cpu()
        distances.extend(torch.where(fooled, size, torch.full_like(size, math.inf)).tolist())
    ctx.step("deepfool")
    median = float(np.median(distances)) if distances else math.inf
    successes = sum(math.isfinite(d) for d in distances)
    return {"deepfool_median_l2": median if math.isfinite(median) else None,
            "_deepfool": {"images": len(distances), "success_rate": share(successes, len(distances)),
                          "max_iter": config.deepfool_max_iter, "overshoot": config.deepfool_overshoot}}


def _noise_sweep(ctx: Context, kind: str, levels: tuple[float, ...],
                 noise: Callable[[Tensor, float, torch.Generator], Tensor]) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy over `noise_copies` noisy copies of each image, and the flip rate on the correctly classified.
    `noise` returns the model's input, already brought back into [0, 1]."""
    accuracy, flips = {}, {}
    model, device, copies = ctx.subject.model, ctx.device, ctx.config.noise_copies
    for level in levels:
        generator = torch.Generator().manual_seed(seed_for(ctx.config.seed, kind, level))
        correct = flipped = counted = 0
        for x, y in ctx.images.batches():
            clean = predictions(model, x, device)
            was_right = clean == y
            for _ in range(copies):
                noisy = noise(x, level, generator)
                predicted = predictions(model, noisy, device)
                correct += int((predicted == y).sum())
                flipped += int(((predicted != clean) & was_right).sum())
                counted += int(was_right.sum())
        accuracy[level_key(level)] = correct / (len(ctx.images) * copies)
        flips[level_key(level)] = share(flipped, counted)
        ctx.step(f"{kind} {level:g}")
    return accuracy, flips


def renormalise(x: Tensor) -> Tensor:
    """Min-max renormalisation of each image (over all its channels and pixels) into [0, 1]: its smallest value
    becomes 0, its largest 1. An image with a single value (no range) is clipped into [0, 1] instead."""
    shape = (len(x),) + (1,) * (x.dim() - 1)
    flat = x.flatten(1)
    low, high = flat.min(dim=1).values.view(shape), flat.max(dim=1).values.view(shape)
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), x.clamp(0.0, 1.0))


def uniform_noise_clipped(x: Tensor, a: float, generator: torch.Generator) -> Tensor:
    """`clip(x + U(0, a), 0, 1)`: noise that is never negative saturates bright pixels at 1."""
    return (x + a * torch.rand(x.shape, generator=generator)).clamp(0.0, 1.0)


def uniform_noise_renormalised(x: Tensor, a: float, generator: torch.Generator) -> Tensor:
    """The weight-map paper's uniform noise (seed 004, section 4): `x + U(0, a)`, then each noisy image
    renormalised into [0, 1] (min-max), so no pixel saturates and the image's contrast shrinks instead."""
    return renormalise(x + a * torch.rand(x.shape, generator=generator))


def measure_gaussian(ctx: Context) -> dict[str, Any]:
    accuracy, flips = _noise_sweep(ctx, "gaussian_noise", ctx.config.gaussian_sigmas,
                                   lambda x, s, g: (x + s * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0))
    return {"gaussian_noise": accuracy, "noise_flip_rate": flips}


def measure_uniform(ctx: Context) -> dict[str, Any]:
    """Uniform noise, clipped into [0, 1] (not the weight-map paper's form: see measure_uniform_renormalised)."""
    accuracy, _ = _noise_sweep(ctx, "uniform_noise", ctx.config.uniform_a, uniform_noise_clipped)
    return {"uniform_noise": accuracy}


def measure_uniform_renormalised(ctx: Context) -> dict[str, Any]:
    """Uniform noise in the weight-map paper's form: each noisy image renormalised into [0, 1]."""
    accuracy, _ = _noise_sweep(ctx, "uniform_noise_renormalised", ctx.config.uniform_a, uniform_noise_renormalised)
    return {"uniform_noise_renormalised": accuracy}


def measure_corruptions(ctx: Context) -> dict[str, Any]:
    result: dict[str, dict[str, float]] = {}
    for name in ctx.config.corruptions:
        result[name] = {}
        for severity in ctx.config.severities:
            generator = torch.Generator().manual_seed(seed_for(ctx.config.seed, name, severity))
            correct = 0
            for x, y in ctx.images.batches():
                correct += int((predictions(ctx.subject.model, corrupt(x, name, severity, generator),
                                            ctx.device) == y).sum())
            result[name][str(severity)] = correct / len(ctx.images)
            ctx.step(f"{name} {severity}")
    means = {name: float(np.mean(list(levels.values()))) for name, levels in result.items()}
    return {"corruptions": result,
            "_corruptions": {"mean": means, "overall": float(np.mean(list(means.values()))) if means else None}}


def _steps(config: EvaluationConfig, subject: Subject) -> int:
    counts = {"variants": 1, "detector": int(subject.detector is not None),
              "calibrated": int(subject.base_model is not None), "fgsm": len(config.fgsm_eps), "minimal_fgsm": 1,
              "autoattack": 1, "deepfool": 1, "gaussian_noise": len(config.gaussian_sigmas),
              "uniform_noise": len(config.uniform_a), "uniform_noise_renormalised": len(config.uniform_a),
              "corruptions": len(config.corruptions) * len(config.severities)}
    return sum(counts[m] for m in config.measures)


MEASURE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "detector": measure_detector, "fgsm": measure_fgsm, "minimal_fgsm": measure_minimal_fgsm,
    "autoattack": measure_autoattack, "deepfool": measure_deepfool, "gaussian_noise": measure_gaussian,
    "uniform_noise": measure_uniform, "uniform_noise_renormalised": measure_uniform_renormalised,
    "corruptions": measure_corruptions,
}


def measure(subject: Subject, store: Store, config: EvaluationConfig, device: torch.device,
            progress: bool = True) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """Run the configured measures: (results in report.json's shape, details, seconds per measure)."""
    subject.model.to(device).eval().requires_grad_(False)
    if subject.base_model is not None:
        subject.base_model.to(device).eval().requires_grad_(False)
    images = TestImages.select(store, config.images, config.seed, config.batch_size, device)
    results: dict[str, Any] = {"method": subject.method}
    details: dict[str, Any] = {"images": len(images), "test_images": store.manifest.splits[TEST].count}
    seconds: dict[str, float] = {}
    with tqdm(total=_steps(config, subject), desc=f"evaluate {subject.name}", unit="step",
              disable=not progress) as bar:
        ctx = Context(subject, store, config, device, images, bar)
        started = time.perf_counter()
        found = measure_variants(ctx) if "variants" in config.measures else measure_clean(ctx)
        seconds["variants" if "variants" in config.measures else "clean"] = time.perf_counter() - started
        with_calibrater = found.pop("_calibrated_with", None)
        results.update(found)
        for name in config.measures:
            if name == "variants":
                continue
            started = time.perf_counter()
            found = measure_calibrated(ctx, with_calibrater) if name == "calibrated" else MEASURE_FUNCTIONS[name](ctx)
            if not found:  # the detector or calibrater measure of another method's run
                continue
            seconds[name] = time.perf_counter() - started
            for key, value in found.items():
                (details if key.startswith("_") else results)[key.lstrip("_")] = value
            log.info("evaluate %s: %s done in %.1f s", subject.name, name, seconds[name])
    return results, details, seconds


# ------------------------------------------------------------------------------------------- the command


@dataclass
class EvaluationResult:
    out: Path
    record: dict[str, Any]


def default_out(target: Path) -> Path:
    """RUN_DIR/evaluation for a run directory, NAME-evaluation beside a checkpoint file."""
    return target / EVALUATION_DIR if target.is_dir() else target.parent / f"{target.stem}-evaluation"


def evaluate(target: str | Path, store_location: str | Path, *, config: EvaluationConfig | None = None,
             out: str | Path | None = None, device: str | torch.device | None = "auto",
             progress: bool = True, storage_options: dict | None = None) -> EvaluationResult:
    """Evaluate a checkpoint or run directory on a store's test split; write evaluation.json, .md and plots."""
    config = config or EvaluationConfig()
    target = Path(target)
    device_ = resolve_device(device)
    store = open_store(store_location, storage_options=storage_options)
    subject = load_subject(target)
    check_fits(subject, store)
    out_dir = Path(out) if out is not None else default_out(target)
    started = time.perf_counter()
    results, details, seconds = measure(subject, store, config, device_, progress)
    manifest = store.manifest
    record = {
        "format": EVALUATION_FORMAT,
        "name": subject.name,
        "method": subject.method,
        "target": str(target),
        "model": {"path": str(subject.model_path), "arch": subject.meta.arch, "num_classes": subject.meta.num_classes,
                  "input_shape": list(subject.meta.input_shape), "fingerprints": subject.fingerprints()},
        "store": {"path": str(store.path), "fingerprint": manifest.fingerprint,
                  "test_fingerprint": manifest.splits[TEST].source_fingerprint, "source": manifest.source,
                  "class_names": list(manifest.class_names), "image_shape": list(manifest.image_shape),
                  "variants": store.variants},
        "config": config.model_dump(mode="json"),
        "device": str(device_),
        "libraries": library_versions(),
        "wall_time_s": {"total": time.perf_counter() - started, **seconds},
        "results": results,
        "details": details,
    }
    write_evaluation(out_dir, record)
    log.info("evaluation of %s written to %s (%.1f s)", subject.name, out_dir, record["wall_time_s"]["total"])
    return EvaluationResult(out_dir, record)
