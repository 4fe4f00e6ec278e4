"""YAML configs validated into typed objects.

One file describes one experiment: where the source images come from, which
model the attacks run against, which variants go into the store, how the
sampler mixes them and how training runs. Unknown or misspelled keys are errors
that name the key and the file, because a silently ignored `epz: 0.3` is a
wasted cluster run.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advpipe.errors import ConfigError, describe_validation_error

SPLITS = ("train", "test")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Section):
    """Where the clean images come from (see advpipe.datasets)."""

    kind: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "npz"] = (
        "digits"
    )
    path: Path | None = None
    image_size: int | None = Field(default=None, ge=4, le=1024)
    channels: Literal[1, 3] | None = None
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = Field(default=0, ge=0, description="seeds numpy's generator, which refuses negatives")
    #: hold the test split out of the format's training split (test_fraction, stratified, split_seed) and
    #: leave its own test set unused, e.g. CIFAR-10's 50k training images -> 45k/5k (the detector paper)
    test_from_train: bool = False
    limit: int | None = Field(default=None, ge=1, description="keep only the first N images per split")

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind != "digits" and self.path is None:
            raise ValueError(f"source.kind '{self.kind}' needs source.path")
        return self


class ModelConfig(Section):
    """The white-box source model the attacks run against."""

    arch: str = "lenet"
    checkpoint: Path = Path("runs/source_model.pt")
    weights: Path | None = Field(default=None, description="local weights file for torchvision:<name>")


class OptimConfig(Section):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    num_workers: int = Field(default=0, ge=0)


class TrainConfig(OptimConfig):
    """Optimisation shared by every method that `advpipe train` runs, and where runs go."""

    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, none on CPU

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads an unquoted `off` as false."""
        return "off" if value is False else value
    checkpoint_every: int = Field(default=0, ge=0, description="also checkpoint every N steps (0: per epoch)")
    eval_batch_size: int = Field(default=512, ge=1)
    runs_dir: Path = Path("runs")
    tensorboard: bool = True


class MethodConfig(BaseModel):
    """One training method's entry: shared options plus the method's own parameters (checked by the method)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str | None = None  # the method to run; default: the entry's own name
    augment: bool = False  # scenario A: random resized crop + horizontal flip (METHODS.md section 1)
    data: Literal["clean", "adversarial", "both", "sampler"] | None = None  # None: the method's own default
    arch: str | None = None  # the architecture to train; default: model.arch

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class VariantConfig(BaseModel):
    """One stored variant: a generator plus its parameters (validated by the generator)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    generator: str | None = None
    backend: Literal["art", "native"] | None = None  # None: the generator's default (its first backend)
    #: how this variant is stored, when not as store.precision (float32 keeps boundary-minimal attacks exact)
    precision: Literal["float16", "float32"] | None = None

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StoreConfig(Section):
    path: Path = Path("runs/store")
    backend: Literal["hdf5", "webdataset"] = "hdf5"
    precision: Literal["float16", "float32", "uint8"] = "float16"
    compression: Literal["gzip", "lzf"] | None = None
    shard_size: int = Field(default=512, ge=1)
    splits: tuple[Literal["train", "test"], ...] = SPLITS


class SlurmConfig(Section):
    """dask-jobqueue SLURMCluster settings, used with `--cluster slurm` (docs/CLUSTER.md)."""

    queue: str | None = None
    account: str | None = None
    cores: int = Field(default=4, ge=1)
    processes: int = Field(default=4, ge=1)
    memory: str = "16GB"
    walltime: str = "02:00:00"
    jobs: int = Field(default=2, ge=1)
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    local_directory: str | None = None


class GenerationConfig(Section):
    batch_size: int = Field(default=128, ge=1)
    cluster: str = Field(default="local", pattern=r"^(local(:[1-9][0-9]*)?|inline|slurm)$")
    scheduler: str | None = None
    threads_per_worker: int = Field(default=1, ge=1)
    retries: int = Field(default=2, ge=0)
    #: success rates need two source-model inference passes per image and variant; off skips them
    statistics: bool = True
    slurm: SlurmConfig = SlurmConfig()


class Range(Section):
    """A closed interval [lo, hi] from which a probability or weight is redrawn."""

    lo: float
    hi: float

    @model_validator(mode="before")
    @classmethod
    def _from_scalar_or_pair(cls, value: Any) -> Any:
        if isinstance(value, int | float):
            return {"lo": value, "hi": value}
        if isinstance(value, list | tuple):
            if len(value) != 2:
                raise ValueError(f"a range is [lo, hi], got {list(value)}")
            return {"lo": value[0], "hi": value[1]}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.lo > self.hi:
            raise ValueError(f"range has lo > hi: [{self.lo}, {self.hi}]")
        if self.lo < 0:
            raise ValueError(f"range must not be negative: [{self.lo}, {self.hi}]")
        return self


class SamplerConfig(Section):
    """The dynamic-probability policy (METHODS.md section 2)."""

    ratio: Range = Range(lo=0.5, hi=0.5)
    weights: dict[str, Range] = Field(default_factory=dict)
    groups: dict[str, list[str]] = Field(default_factory=dict)
    redraw: Literal["epoch", "batch", "sample"] = "epoch"
    adaptive: bool = False
    adapt_rate: float = Field(default=0.5, ge=0, le=1)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=128, ge=1)
    pair_clean: bool = False

    @field_validator("ratio")
    @classmethod
    def _ratio_is_probability(cls, value: Range) -> Range:
        if value.hi > 1:
            raise ValueError(f"adversarial ratio must lie in [0, 1], got [{value.lo}, {value.hi}]")
        return value


Measure = Literal["variants", "detector", "calibrated", "fgsm", "minimal_fgsm", "autoattack", "deepfool",
                  "gaussian_noise", "uniform_noise", "corruptions"]
Corruption = Literal["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur", "contrast",
                     "brightness", "jpeg_compression", "pixelate"]
AutoAttackComponent = Literal["apgd-ce", "apgd-t", "deepfool", "square"]
MEASURES: tuple[str, ...] = get_args(Measure)
CORRUPTIONS: tuple[str, ...] = get_args(Corruption)
AUTOATTACK_COMPONENTS: tuple[str, ...] = get_args(AutoAttackComponent)


class AutoAttackConfig(Section):
    """AutoAttack through ART (docs/REPORT.md): the defaults are the standard setting; anything less is labelled."""

    eps: float = Field(default=8 / 255, gt=0.0, le=1.0)
    norm: Literal["linf", "l2"] = "linf"
    components: tuple[AutoAttackComponent, ...] = Field(default=AUTOATTACK_COMPONENTS, min_length=1)
    images: int | None = Field(default=None, ge=1, description="test images attacked (None: the whole split)")
    iterations: int = Field(default=100, ge=1, description="APGD iterations (standard: 100)")
    targets: int = Field(default=9, ge=1, description="APGD-T target classes per image (standard: 9)")
    square_queries: int = Field(default=5000, ge=1, description="Square attack queries (standard: 5000)")


class EvaluationConfig(Section):
    """What `advpipe evaluate` measures on a store's test split, and how hard (docs/REPORT.md)."""

    measures: tuple[Measure, ...] = MEASURES  # type: ignore[assignment]
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=256, ge=1)
    images: int | None = Field(default=None, ge=1,
                               description="test images (a seeded subset) for every measure but the variants")
    fgsm_eps: tuple[float, ...] = Field(default=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3), min_length=1)
    minimal_fgsm_step: float = Field(default=0.01, gt=0.0, le=1.0, description="eps grid of the minimal-FGSM search")
    minimal_fgsm_max: float = Field(default=1.0, gt=0.0, le=1.0, description="largest eps the search tries")
    autoattack: AutoAttackConfig = AutoAttackConfig()
    deepfool_images: int | None = Field(default=None, ge=1)
    deepfool_max_iter: int = Field(default=50, ge=1)
    deepfool_overshoot: float = Field(default=0.02, ge=0.0, le=1.0)
    gaussian_sigmas: tuple[float, ...] = Field(default=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5), min_length=1)
    uniform_a: tuple[float, ...] = Field(default=(0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0), min_length=1)
    noise_copies: int = Field(default=10, ge=1, description="noisy copies of each image per noise level")
    corruptions: tuple[Corruption, ...] = CORRUPTIONS  # type: ignore[assignment]
    severities: tuple[Literal[1, 2, 3, 4, 5], ...] = (1, 2, 3, 4, 5)

    @field_validator("fgsm_eps", "gaussian_sigmas", "uniform_a")
    @classmethod
    def _levels(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < level <= 1.0 for level in value):
            raise ValueError(f"every level must lie in (0, 1] (pixels are in [0, 1]), got {list(value)}")
        if len(set(value)) != len(value):
            raise ValueError(f"levels are listed twice: {list(value)}")
        return tuple(sorted(value))

    @field_validator("measures", "corruptions", "severities")
    @classmethod
    def _distinct(cls, value: tuple) -> tuple:
        if len(set(value)) != len(value):
            raise ValueError(f"entries are listed twice: {list(value)}")
        return value

    @model_validator(mode="after")
    def _search(self) -> EvaluationConfig:
        if self.minimal_fgsm_step > self.minimal_fgsm_max:
            raise ValueError(f"minimal_fgsm_step ({self.minimal_fgsm_step}) is larger than minimal_fgsm_max "
                             f"({self.minimal_fgsm_max})")
        return self


class Config(Section):
    name: str = "experiment"
    #: Seeds every per-image generator stream (numpy SeedSequence, which refuses negatives).
    seed: int = Field(default=0, ge=0)
    device: str = "auto"
    source: SourceConfig = SourceConfig()
    model: ModelConfig = ModelConfig()
    train_source: OptimConfig = OptimConfig()
    store: StoreConfig = StoreConfig()
    variants: dict[str, VariantConfig] = Field(default_factory=dict)
    generation: GenerationConfig = GenerationConfig()
    sampler: SamplerConfig = SamplerConfig()
    train: TrainConfig = TrainConfig()
    methods: dict[str, MethodConfig] = Field(default_factory=dict)
    evaluation: EvaluationConfig = EvaluationConfig()

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        for name in value:
            if name == "clean" or not name or "/" in name or name.startswith("."):
                raise ValueError(f"variant name '{name}' is reserved or not a valid name")
        return value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config; every problem becomes a ConfigError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return config_from_dict(raw, origin=str(path))


def config_from_dict(raw: dict[str, Any], origin: str = "<config>") -> Config:
    """Validate a plain dict (e.g. built in Python) exactly as a YAML file would be."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(describe_validation_error(exc, f"{origin}: "))) from None
    _check_plugin_entries(config, origin)
    return config


#: Entries of these sections name a plugin (a generator, a training method) whose own typed
#: parameters check them. The plugins live in the layers above the config and are found by
#: module path when a config is checked, so this module imports neither.
PLUGIN_CHECKS = {"variants": "advpipe.pipeline.generators:validate_variant",
                 "methods": "advpipe.trainers.registry:validate_method"}


def _check_plugin_entries(config: Config, origin: str) -> None:
    for section, target in PLUGIN_CHECKS.items():
        entries = getattr(config, section)
        if not entries:
            continue
        module, _, function = target.partition(":")
        check = getattr(importlib.import_module(module), function)
        for name, entry in entries.items():
            try:
                check(name, entry)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {section}.{name}: {exc}") from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
