"""Property-based fuzzing of the config loader: whatever the bytes, a Config or a ConfigError, cheaply.

The loader is the one place that reads a file a user (or anyone who can write to the config directory)
controls. For any byte string it must return a valid Config or raise ConfigError whose message is short
and names the file, never another exception, and it must do so within a fixed time and memory budget.
Inputs come from four generators: raw bytes; YAML-shaped text (the characters YAML gives meaning to);
mappings built from the real section and key names with hostile values, dumped as YAML; and the shipped
configs with bytes spliced, repeated or deleted. Runs are derandomised so CI sees the same examples.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import yaml
from conftest import time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advpipe.config import Config, config_from_dict, load_config, parse_config
from advpipe.errors import ConfigError
from advpipe.trainers.registry import REGISTRY, method_class

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [path.read_bytes() for path in sorted((ROOT / "configs").glob("*.yaml"))]
ORIGIN = "fuzz.yaml"

#: per input: Python-visible memory and seconds (the budget is loose for a shared CI machine; the inputs
#: are at most a few kilobytes, and an alias bomb of that size costs gigabytes and minutes when unbounded)
MEMORY_BUDGET = 32 << 20
SECONDS_BUDGET = 10.0

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The plugin checks import generators and methods on first use (torch, ART: seconds on a busy machine); they
# are imported here so that no example is timed with an import in it.
for _method in REGISTRY:
    method_class(_method)
for _data in SHIPPED:
    config_from_dict(parse_config(_data))

YAML_CHARS = "&*!|>'\"%@`#,[]{}:-?<= \t\n\r.0123456789eE+_~abxyzlnotrufsLNO\\/\x00\x85\ufeff\u2028é"
SECTIONS = {name: sorted(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
            for name, field in Config.model_fields.items()}


def check(data: bytes) -> Config | None:
    """Load `data` under tracemalloc and a clock; fail on anything but a Config or a bounded ConfigError."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with time_limit(SECONDS_BUDGET):
            config = config_from_dict(parse_config(data, ORIGIN), ORIGIN)
    except ConfigError as exc:
        config = None
        message = str(exc)
        assert message.startswith(f"{ORIGIN}: "), message
        assert len(message) <= 12 * 600, message[:2000]  # at most 10 problems and a count, each line bounded
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start <= SECONDS_BUDGET
    assert peak <= MEMORY_BUDGET, f"peak {peak / 2**20:.1f} MiB"
    return config


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.text(max_size=3000),
    st.sampled_from(["digits", "mnist", "npz", "fgsm", "gaussian", "hdf5", "webdataset", "", ".", "..", "/",
                     "runs/x", "cpu", "auto", "local:0", "inline", "off", "epoch", "clean", "dynamic"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)), max_leaves=30)


@st.composite
def config_like(draw) -> bytes:
    """A mapping of real section names to mappings of real keys (and some made-up ones), hostile values."""
    raw = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=5, unique=True)):
        keys = SECTIONS[section] or ["generator", "eps", "sigma", "method", "data", "arch", "backend"]
        if section in ("variants", "methods"):
            raw[section] = {draw(st.text(max_size=10)): {draw(st.sampled_from(keys)): draw(values)
                                                         for _ in range(draw(st.integers(0, 3)))}
                            for _ in range(draw(st.integers(0, 3)))}
        elif keys:
            raw[section] = {draw(st.sampled_from(keys + ["zzz"])): draw(values)
                            for _ in range(draw(st.integers(0, 4)))}
        else:
            raw[section] = draw(values)
    return yaml.safe_dump(raw, allow_unicode=draw(st.booleans())).encode()


@st.composite
def mutated_shipped(draw) -> bytes:
    """A shipped config with a few bytes deleted, replaced, or a slice repeated."""
    data = bytearray(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, min(len(data), start + 64)))
        action = draw(st.sampled_from(["delete", "replace", "repeat"]))
        if action == "delete":
            del data[start:end]
        elif action == "replace":
            data[start:end] = draw(st.binary(max_size=16))
        else:
            data[start:start] = bytes(data[start:end]) * draw(st.integers(1, 50))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=3000))
def test_any_bytes_give_a_config_or_a_config_error(data):
    check(data)


@FUZZ
@given(st.text(alphabet=YAML_CHARS, max_size=600))
def test_yaml_shaped_text_gives_a_config_or_a_config_error(text):
    check(text.encode("utf-8", errors="surrogatepass"))


@FUZZ
@given(config_like())
def test_real_keys_with_hostile_values_give_a_config_or_a_config_error(data):
    check(data)


@FUZZ
@given(mutated_shipped())
def test_mutated_shipped_configs_give_a_config_or_a_config_error(data):
    check(data)


@FUZZ
@given(st.integers(2, 12), st.integers(2, 12), st.sampled_from(["[@]", "{k: [@]}", "[@, [@]]"]))
def test_anchor_chains_of_any_width_and_depth_stay_bounded(width, depth, shape):
    """The alias-bomb family: each level repeats the previous `width` times (width**depth once expanded)."""
    lines = ["l0: &l0 [x]"]
    for level in range(1, depth + 1):
        inner = ", ".join(f"*l{level - 1}" for _ in range(width))
        lines.append(f"l{level}: &l{level} " + shape.replace("@", inner))
    config = check("\n".join(lines).encode())
    assert config is None  # l0.. are not config sections: whatever the size, it is refused


def test_the_fuzzer_reaches_valid_configs_too(tmp_path):
    """The property is not vacuous: the shipped configs pass `check` and load into a Config."""
    for data in SHIPPED:
        assert isinstance(check(data), Config)
    path = tmp_path / "c.yaml"
    path.write_bytes(SHIPPED[0])
    assert isinstance(load_config(path), Config)
