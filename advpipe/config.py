"""YAML configs validated into typed objects.

One file describes one experiment: where the source images come from, which
model the attacks run against, which variants go into the store, how the
sampler mixes them and how training runs. Unknown or misspelled keys are errors
that name the key and the file, because a silently ignored `epz: 0.3` is a
wasted cluster run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advpipe.errors import ConfigError

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
    split_seed: int = 0
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


class VariantConfig(BaseModel):
    """One stored variant: a generator plus its parameters (validated by the generator)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    generator: str | None = None
    backend: Literal["art", "native"] | None = None  # None: the generator's default (its first backend)

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
    seed: int = 0
    batch_size: int = Field(default=128, ge=1)
    pair_clean: bool = False

    @field_validator("ratio")
    @classmethod
    def _ratio_is_probability(cls, value: Range) -> Range:
        if value.hi > 1:
            raise ValueError(f"adversarial ratio must lie in [0, 1], got [{value.lo}, {value.hi}]")
        return value


class Config(Section):
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    source: SourceConfig = SourceConfig()
    model: ModelConfig = ModelConfig()
    train_source: OptimConfig = OptimConfig()
    store: StoreConfig = StoreConfig()
    variants: dict[str, VariantConfig] = Field(default_factory=dict)
    generation: GenerationConfig = GenerationConfig()
    sampler: SamplerConfig = SamplerConfig()

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
        raise ConfigError(_describe(exc, origin)) from None
    _validate_variants(config, origin)
    return config


def _validate_variants(config: Config, origin: str) -> None:
    from advpipe.pipeline.generators import validate_variant  # light import: no ART

    for name, variant in config.variants.items():
        try:
            validate_variant(name, variant)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: variants.{name}: {exc}") from None


def _describe(exc: ValidationError, origin: str) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{key}' (check its spelling against the docs)")
        elif error["type"] == "missing":
            lines.append(f"{origin}: missing key '{key}'")
        else:
            message = error["msg"].removeprefix("Value error, ")
            shown = f" (got {error['input']!r})" if not isinstance(error["input"], dict) else ""
            lines.append(f"{origin}: key '{key}': {message}{shown}")
    return "\n".join(lines)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
