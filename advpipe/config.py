"""YAML configs validated into typed objects.

One file describes one experiment: where the source images come from, which
model the attacks run against, which variants go into the store, how the
sampler mixes them and how training runs. Unknown or misspelled keys are errors
that name the key and the file, because a silently ignored `epz: 0.3` is a
wasted cluster run.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from advpipe.errors import SHOWN_CHARS, ConfigError, describe_validation_error, shorten, shown

SPLITS = ("train", "test")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def _url_or_path(value: Any) -> Any:
    """A URL stays a string (a Path would fold its '//'); anything else is a local path."""
    if isinstance(value, str) and _URL.match(value):
        return value
    return Path(value) if isinstance(value, str) else value


def _no_credentials(value: dict[str, Any]) -> dict[str, Any]:
    """Storage options as given; refused when one holds a credential (docs/OBJECT_STORAGE.md)."""
    from advpipe.urls import check_options

    try:
        return check_options(value, "")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


#: a local path, or an fsspec URL kept as written
Location = Annotated[Path | str, BeforeValidator(_url_or_path)]
#: fsspec options for a location's protocol (e.g. profile); never credentials
StorageOptions = Annotated[dict[str, Any], AfterValidator(_no_credentials)]


def _own_path(value: Path, key: str) -> Path:
    """Refuse a path that names no place of its own: '' and '.' (the working directory), '..', a root."""
    if value == Path(".") or value.name in ("", "..") or value == Path(value.anchor):
        raise ValueError(f"{key} '{value}' names the working directory, a parent or a root, which it would fill "
                         "or clear; give a path of its own (e.g. runs/store)")
    return value


class SourceConfig(Section):
    """Where the clean images come from (see advpipe.datasets)."""

    kind: Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "npz", "webdataset"] = (
        "digits"
    )
    #: a local path; for `webdataset` also a URL (s3://, http(s)://, ...) and WebDataset brace patterns
    #: ("s3://bucket/imagenet/train-{000000..001281}.tar")
    path: Location | None = None
    #: `webdataset` only: the predefined test split's shards (a pattern, directory or URL); unset: split `path`
    test_path: Location | None = None
    #: `webdataset` only: the member holding each image's label: `cls` (an ASCII integer) or `json:KEY`
    label: str = Field(default="cls", pattern=r"^(cls|json:[A-Za-z0-9_.-]+)$")
    #: `webdataset` only: the class names, in label order (None: '0', '1', ... up to the largest label)
    class_names: tuple[str, ...] | None = None
    image_size: int | None = Field(default=None, ge=4, le=1024)
    channels: Literal[1, 3] | None = None
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = Field(default=0, ge=0, description="seeds numpy's generator, which refuses negatives")
    #: hold the test split out of the format's training split (test_fraction, stratified, split_seed) and
    #: leave its own test set unused, e.g. CIFAR-10's 50k training images -> 45k/5k (the detector paper)
    test_from_train: bool = False
    limit: int | None = Field(default=None, ge=1, description="keep only the first N images per split")
    #: endpoint of an S3-compatible service holding a `webdataset` source; None: AWS_ENDPOINT_URL(_S3), else AWS
    endpoint_url: str | None = None
    #: further fsspec options for the source's protocol (e.g. profile, anon); never credentials
    storage_options: StorageOptions = Field(default_factory=dict)

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind != "digits" and self.path is None:
            raise ValueError(f"source.kind '{self.kind}' needs source.path")
        if isinstance(self.path, str) and self.kind != "webdataset":
            raise ValueError(f"source.kind '{self.kind}' reads a local path, not the URL '{self.path}'; only "
                             "source.kind 'webdataset' reads from object storage or the web")
        if self.kind != "webdataset" and (self.test_path is not None or self.class_names is not None
                                          or self.label != "cls"):
            raise ValueError("source.test_path, source.label and source.class_names belong to source.kind "
                             f"'webdataset', not '{self.kind}'")
        return self

    def cache_key(self) -> str:
        """The config as canonical JSON: a hashable key (storage_options makes the model itself unhashable)."""
        return self.model_dump_json()


class ModelConfig(Section):
    """The white-box source model the attacks run against."""

    arch: str = "lenet"
    checkpoint: Path = Path("runs/source_model.pt")
    weights: Path | None = Field(default=None, description="local weights file for torchvision:<name>")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_is_a_file(cls, value: Path) -> Path:
        return _own_path(value, "model.checkpoint")


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
    #: a local directory, or an fsspec URL (s3://bucket/prefix, gs://, az://) that generation writes straight to
    path: Location = Path("runs/store")
    backend: Literal["hdf5", "webdataset"] = "hdf5"
    precision: Literal["float16", "float32", "uint8"] = "float16"
    compression: Literal["gzip", "lzf"] | None = None
    shard_size: int = Field(default=512, ge=1)
    splits: tuple[Literal["train", "test"], ...] = SPLITS

    @field_validator("path")
    @classmethod
    def _store_has_its_own_directory(cls, value: Path | str) -> Path | str:
        return _own_path(value, "store.path") if isinstance(value, Path) else value

    #: endpoint of an S3-compatible service (MinIO, Ceph, ...); None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    endpoint_url: str | None = None
    #: further fsspec options for the store's protocol (e.g. profile); never credentials (docs/OBJECT_STORAGE.md)
    storage_options: StorageOptions = Field(default_factory=dict)


class SlurmConfig(Section):
    """dask-jobqueue SLURMCluster settings, used with `--cluster slurm` (docs/CLUSTER.md)."""

    queue: str | None = None
    account: str | None = None
    cores: int = Field(default=4, ge=1, description="cores per job (#SBATCH --cpus-per-task)")
    processes: int = Field(default=4, ge=1, description="worker processes per job, cores/processes threads each")
    memory: str = Field(default="16GB", description="memory per job (#SBATCH --mem)")
    walltime: str = "02:00:00"
    jobs: int = Field(default=2, ge=1, description="jobs submitted; workers = jobs * processes")
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    local_directory: str | None = None
    #: the python the jobs run `distributed.cli.dask_worker` with (None: the client's own, e.g. its venv's)
    python: str | None = None
    #: network interface the scheduler listens on and workers reach it by (e.g. ib0; lo on a one-node cluster)
    interface: str | None = None
    #: where the jobs' stdout/stderr go (None: SLURM's default, slurm-JOBID.out in the submitting directory)
    log_directory: str | None = None
    #: GPUs per job (#SBATCH --gres=gpu:N); each of the job's worker processes then sees one of them
    gpus_per_job: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _whole_cores(self) -> SlurmConfig:
        if self.processes > self.cores:
            raise ValueError(f"processes ({self.processes}) must not exceed cores ({self.cores}): each worker "
                             "process needs at least one core's thread")
        if self.gpus_per_job and self.processes > self.gpus_per_job:
            raise ValueError(f"processes ({self.processes}) must not exceed gpus_per_job ({self.gpus_per_job}): "
                             "each worker process gets a GPU of its own")
        return self


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
                raise ValueError(f"a range is [lo, hi], got {shown(list(value))}")
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
    stored_form: bool = Field(default=False, description="loaders yield images as stored (uint8 + stored delta); "
                              "the training loop decodes them after moving them to the device (README, num_workers)")

    @field_validator("ratio")
    @classmethod
    def _ratio_is_probability(cls, value: Range) -> Range:
        if value.hi > 1:
            raise ValueError(f"adversarial ratio must lie in [0, 1], got [{value.lo}, {value.hi}]")
        return value


Measure = Literal["variants", "detector", "calibrated", "fgsm", "minimal_fgsm", "autoattack", "deepfool",
                  "gaussian_noise", "uniform_noise", "uniform_noise_renormalised", "corruptions"]
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
            raise ValueError(f"every level must lie in (0, 1] (pixels are in [0, 1]), got {shown(list(value))}")
        if len(set(value)) != len(value):
            raise ValueError(f"levels are listed twice: {shown(list(value))}")
        return tuple(sorted(value))

    @field_validator("measures", "corruptions", "severities")
    @classmethod
    def _distinct(cls, value: tuple) -> tuple:
        if len(set(value)) != len(value):
            raise ValueError(f"entries are listed twice: {shown(list(value))}")
        return value

    @model_validator(mode="after")
    def _search(self) -> EvaluationConfig:
        if self.minimal_fgsm_step > self.minimal_fgsm_max:
            raise ValueError(f"minimal_fgsm_step ({self.minimal_fgsm_step}) is larger than minimal_fgsm_max "
                             f"({self.minimal_fgsm_max})")
        return self


class Config(Section):
    #: names the run directories (train.runs_dir / name / method), so it is one path component
    name: str = Field(default="experiment", min_length=1, max_length=128)
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

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, value: str) -> str:
        if value in (".", "..") or any(char in value for char in "/\\\0"):
            raise ValueError("name must be a folder name of its own under train.runs_dir (no '/', '\\', "
                             "'.' or '..')")
        return value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        for name in value:
            if name == "clean" or not name or "/" in name or name.startswith("."):
                raise ValueError(f"variant name {shown(name)} is reserved or not a valid name")
        return value

    @field_validator("methods")
    @classmethod
    def _method_names(cls, value: dict[str, MethodConfig]) -> dict[str, MethodConfig]:
        """Each entry trains into train.runs_dir / name / entry, so an entry is one folder name."""
        for name in value:
            if not name or "/" in name or "\\" in name or "\0" in name or name.startswith(".") or len(name) > 128:
                raise ValueError(f"method entry {shown(name)} is not a valid folder name (no '/', '\\', leading "
                                 "'.', at most 128 characters)")
        return value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config; every problem becomes a ConfigError naming the file and the key."""
    path = Path(path)
    raw = parse_config(read_config_bytes(path), str(path))
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, str(path))
    return config_from_dict(raw, origin=str(path))


def read_config_bytes(path: Path) -> bytes:
    """The file's bytes, refused unread past MAX_CONFIG_BYTES (a config is a few kilobytes)."""
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: is not a file; give the path of a YAML config")
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_CONFIG_BYTES + 1)  # parse_config refuses the one byte too many
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None


def parse_config(data: bytes, origin: str = "<config>") -> dict[str, Any]:
    """The mapping of sections a config file's bytes hold, checked to be bounded and unambiguous.

    Refused with a ConfigError: bytes that are not UTF-8, an empty document (it would silently run every
    default), YAML errors, duplicate or non-text keys, alias bombs and deep nesting (see _BoundedLoader),
    a top level that is not a mapping, and numbers that no setting can hold (NaN, infinities, integers
    beyond 64 bits).
    """
    if len(data) > MAX_CONFIG_BYTES:
        if data.lstrip().startswith(b"{") and STORE_MANIFEST_MARK in data:  # a large store's manifest.json
            raise ConfigError(_store_manifest_message(origin))
        raise ConfigError(f"{origin}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config is a few kilobytes of "
                          "YAML, is this the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                          "a config is a YAML text file, is this the right file?") from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {_yaml_problem(exc)}") from None
    except (ValueError, OverflowError) as exc:  # a scalar PyYAML accepts but cannot build (a 10k-digit int)
        raise ConfigError(f"{origin}: not valid YAML: a value cannot be read ({shorten(str(exc))})") from None
    if raw is None:
        raise ConfigError(f"{origin}: the config is empty; write at least one section (an empty mapping `{{}}` "
                          "takes every default)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    _refuse_store_manifest(raw, origin)
    _check_numbers(raw, origin, ())
    return raw


#: how a store's manifest.json (JSON, which YAML reads too) begins to show itself among its first keys
STORE_MANIFEST_MARK = b'"format": "advpipe-store"'


def _refuse_store_manifest(raw: dict[str, Any], origin: str) -> None:
    """A store's manifest.json given where a config belongs: one line saying so, not a list of unknown keys."""
    if not isinstance(raw, dict):
        return
    if raw.get("format") == "advpipe-store" or ("format_version" in raw and ("splits" in raw or "variants" in raw)):
        raise ConfigError(_store_manifest_message(origin))


def _store_manifest_message(origin: str) -> str:
    return (f"{origin}: is a store's manifest, not a config; pass a YAML config such as configs/digits.yaml (a "
            "store is named by its directory: `advpipe sample STORE --config CONFIG`)")


def config_from_dict(raw: dict[str, Any], origin: str = "<config>") -> Config:
    """Validate a plain dict (e.g. built in Python) exactly as a YAML file would be."""
    _refuse_store_manifest(raw, origin)
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
                raise ConfigError(f"{origin}: {section}.{shorten(str(name))}: {exc}") from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: cannot set '{shorten(dotted)}': '{shorten(part)}' is not a section")
    node[leaf] = value


#: a config is a few kilobytes (the largest shipped one is 5 KiB); a file past this is refused unread
MAX_CONFIG_BYTES = 256 << 10
#: aliases (*name) one config may use; anchors are for sharing a few settings, not for repetition
MAX_ALIASES = 100
#: nesting of mappings and lists (aliases expanded); the shipped configs nest 5 levels
MAX_DEPTH = 24
#: values (keys, scalars, lists, mappings) with every alias expanded, where the shipped configs have at most
#: 240: an alias bomb multiplies these per level; pure-Python YAML composes about 10k values a second
MAX_NODES = 10_000
#: integers a setting can hold (numpy, torch and the samplers take 64-bit integers)
INT64 = 2**63
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """What _BoundedLoader refuses, located like any YAML error."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing what no config needs and what makes loading costly or ambiguous.

    Composing counts aliases and nesting as it goes (it recurses per level, so depth must be refused
    before Python's stack runs out); the composed document is then sized with aliases expanded (an
    alias bomb is a few hundred bytes of nodes that expand to gigabytes) before anything is built.
    Building a mapping refuses duplicate keys (PyYAML keeps the last silently) and non-text keys.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Refused(problem=f"more than {MAX_ALIASES} aliases (*name); repeat settings less, or "
                               "write them out", problem_mark=event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=event.start_mark)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Refused(problem=f"more than {MAX_NODES} values; a config is a few hundred",
                           problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _ExpandedSize().measure(node, 1)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise _Refused(problem=f"key {shown(key)} is not text (YAML reads numbers, true/false, "
                                   "yes/no, on/off and null as values); quote it", problem_mark=key_node.start_mark)
                if key in seen:
                    raise _Refused(problem=f"key '{shorten(key)}' appears twice (lines {seen[key]} and {line}); "
                                   "keep one", problem_mark=key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _ExpandedSize:
    """Size and depth of a composed YAML graph with aliases expanded, memoised per node (so linear in the
    nodes actually written), refused past MAX_NODES or MAX_DEPTH, or when an alias refers to its own
    ancestor (a recursive structure)."""

    def __init__(self) -> None:
        self.sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, height)
        self.open: set[int] = set()

    def measure(self, node: Any, level: int) -> tuple[int, int]:
        known = self.sizes.get(id(node))
        if known is None:
            if id(node) in self.open:
                raise _Refused(problem="an alias refers to a mapping or list that contains it (a recursive "
                               "structure)", problem_mark=node.start_mark)
            known = self._measure_children(node, level)
            self.sizes[id(node)] = known
        size, height = known
        if level - 1 + height > MAX_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels once aliases are expanded",
                           problem_mark=node.start_mark)
        return known

    def _measure_children(self, node: Any, level: int) -> tuple[int, int]:
        if isinstance(node, yaml.ScalarNode):
            return 1, 1
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value))
        self.open.add(id(node))
        size, height = 1, 1
        for child in children:
            child_size, child_height = self.measure(child, level + 1)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_NODES:
                raise _Refused(problem=f"expands to more than {MAX_NODES} values once aliases are expanded "
                               "(an alias bomb?)", problem_mark=node.start_mark)
        self.open.discard(id(node))
        return size, height


def _load_yaml(text: str) -> Any:
    loader = _BoundedLoader(text)  # checks every character is printable before anything else
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where (line, column) and what, however long the offending text was."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(part for part in (exc.context, exc.problem) if part) or "invalid"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return f"{where}{shorten(what, 2 * SHOWN_CHARS)}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character {exc.position + 1}: {exc.reason} #x{exc.character:04x}"
    return shorten(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 2 * SHOWN_CHARS)


def _check_numbers(value: Any, origin: str, where: tuple[str, ...]) -> None:
    """Refuse NaN, infinities and integers beyond 64 bits anywhere (no setting means them); names the key."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, origin, (*where, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_numbers(item, origin, (*where, str(index)))
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{origin}: key '{shorten('.'.join(where))}': {value} is not a usable number; "
                          "give a finite value")
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise ConfigError(f"{origin}: key '{shorten('.'.join(where))}': {shown(value)} is beyond the 64-bit "
                          "integers any setting can hold")
