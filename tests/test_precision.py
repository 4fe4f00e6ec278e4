"""Per-variant precision: float16 can undo boundary-minimal adversarials; the manifest counts what storage
lost, `generate` warns, and a variant stored as float32 loses none."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import config_at

from advpipe.config import SourceConfig, VariantConfig
from advpipe.datasets import load_source
from advpipe.errors import ConfigError
from advpipe.models.checkpoint import load_checkpoint
from advpipe.pipeline.generators import generator_class, validate_variant
from advpipe.pipeline.job import generate
from advpipe.pipeline.plan import variant_plans
from advpipe.stores import codec, open_store, verify_store
from advpipe.stores.inspect import card

COUNT = 64
EDGE = {"generator": "deepfool", "overshoot": 0.0, "backend": "native"}  # stops exactly on the boundary


def predict(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


def fresh_edge(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The boundary DeepFool output, computed again outside the pipeline in the same batches of 32."""
    variant = VariantConfig(**EDGE)
    generator = generator_class("deepfool")(validate_variant("edge", variant), model, backend="native", batch_size=32)
    return np.concatenate([generator.generate(torch.from_numpy(x[i:i + 32]), torch.from_numpy(y[i:i + 32]),
                                              np.zeros(32, dtype=np.uint64)).numpy() for i in range(0, len(x), 32)])


def test_storage_losses_are_counted_and_float32_variants_lose_none(tmp_path, digits_model, caplog):
    variants = {
        "cw": {"backend": "native", "precision": "float32"},  # the C&W default: a binary search over c
        "edge": dict(EDGE),  # float16, the store's precision
        "edge32": {**EDGE, "precision": "float32"},
    }
    config = config_at(tmp_path, digits_model, variants=variants, limit=COUNT, splits=["test"])
    with caplog.at_level(logging.WARNING, logger="advpipe.pipeline.job"):
        manifest = generate(config, progress=False).manifest
    assert verify_store(tmp_path / "store").ok
    placement = {v.name: (v.precision, v.array, v.column, v.kind) for v in manifest.variants}
    assert placement == {"cw": ("float32", "variants_float32", 0, "attack"),
                         "edge": ("float16", "variants", 0, "attack"),
                         "edge32": ("float32", "variants_float32", 1, "attack")}
    stats = manifest.splits["test"].stats

    cw = stats["cw"]
    assert cw.success_rate_fresh > 0.8 and cw.lost == 0 and cw.fooled == cw.fooled_fresh
    assert cw.seconds > 0 and cw.images_per_second == pytest.approx(COUNT / cw.seconds)

    # the same boundary attack, counted independently: fresh output vs what the store returns
    model, _ = load_checkpoint(digits_model)
    source = load_source(SourceConfig(kind="digits", image_size=16, limit=COUNT), "test")
    clean = np.ascontiguousarray(source.images.transpose(0, 3, 1, 2))
    y, x = np.array(source.labels), codec.to_float(np.ascontiguousarray(source.images.transpose(0, 3, 1, 2)))
    store = open_store(tmp_path / "store")
    reader = store.split("test")
    correct = predict(model, x) == y
    fooled_fresh = correct & (predict(model, np.clip(fresh_edge(model, x, y), 0, 1)) != y)
    for name in ("edge", "edge32"):
        fooled = correct & (predict(model, reader.read(np.arange(COUNT), store.variant_id(name))) != y)
        assert (stats[name].clean_correct, stats[name].fooled_fresh, stats[name].fooled) == (
            correct.sum(), fooled_fresh.sum(), fooled.sum())
        assert stats[name].lost == (fooled_fresh & ~fooled).sum()
    assert stats["edge"].lost > 0, "float16 keeps every boundary adversarial: the test lost its point"
    assert stats["edge32"].lost == 0 and stats["edge32"].fooled == stats["edge32"].fooled_fresh
    np.testing.assert_allclose(reader.read(np.arange(COUNT), store.variant_id("edge32")),
                               np.clip(codec.encode(clean, fresh_edge(model, x, y), "float32").fresh, 0, 1), atol=1e-6)

    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"edge/test: {stats['edge'].lost} of ")
    assert "precision: float32" in warned[0]
    row = next(line for line in card(manifest, tmp_path / "store").splitlines() if line.startswith("edge "))
    assert f" {stats['edge'].lost} " in row and "float16" in row


def test_a_variant_precision_the_store_cannot_hold_is_refused(tmp_path, digits_model):
    config = config_at(tmp_path, digits_model, variants={"cw": {"backend": "native", "precision": "float32"}},
                       precision="uint8")
    with pytest.raises(ConfigError, match="in a uint8 store.*store.precision"):
        variant_plans(config)
    plans = variant_plans(config_at(tmp_path, digits_model, variants={"cw": {"precision": "float16"}}))
    assert plans[0].precision is None  # the store's own precision: the same variant as without the key
    assert plans[0].fingerprint == variant_plans(config_at(tmp_path, digits_model, variants={"cw": {}}))[0].fingerprint
