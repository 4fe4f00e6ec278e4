"""Stored minimal attacks keep their effect: what the store returns fools the model as often as fresh arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advpipe.config import SourceConfig, VariantConfig
from advpipe.datasets import load_source
from advpipe.models.checkpoint import load_checkpoint
from advpipe.pipeline.generators import generator_class, validate_variant, variant_backend
from advpipe.stores import codec


def success(model, x: np.ndarray, y: np.ndarray, correct: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model(torch.from_numpy(x)).argmax(1).numpy()
    return float(((predictions != y) & correct).sum() / correct.sum())


@pytest.mark.parametrize("name,params", [
    ("deepfool", {"backend": "art", "max_iter": 50}),
    ("deepfool", {"backend": "native"}),
    ("cw", {"backend": "native"}),
    ("cw", {"backend": "art", "max_iter": 20}),
])
def test_stored_minimal_attacks_fool_as_often_as_fresh_ones(digits_model, name, params):
    model, _ = load_checkpoint(digits_model)
    count = 128 if params["backend"] == "art" else 359
    source = load_source(SourceConfig(kind="digits", image_size=16), "test")
    clean = np.ascontiguousarray(source.images[:count].transpose(0, 3, 1, 2))
    y = np.array(source.labels[:count])
    x = codec.to_float(clean)
    variant = VariantConfig(generator=name, **params)
    generator = generator_class(name)(validate_variant(name, variant), model,
                                      backend=variant_backend(name, variant), batch_size=128)
    fresh = np.concatenate([generator.generate(torch.from_numpy(x[i:i + 128]), torch.from_numpy(y[i:i + 128]),
                                               np.arange(i, i + 128, dtype=np.uint64)).numpy()
                            for i in range(0, count, 128)])
    with torch.no_grad():
        correct = model(torch.from_numpy(x)).argmax(1).numpy() == y
    rates = {}
    for precision in ("float32", "float16", "uint8"):
        stored = codec.encode(clean, fresh, precision).stored
        rates[precision] = success(model, codec.decode(clean, stored, precision), y, correct)
    fresh_rate = success(model, fresh, y, correct)
    assert fresh_rate > 0.8
    assert abs(rates["float16"] - fresh_rate) <= 0.005, rates
    assert abs(rates["float32"] - fresh_rate) <= 0.005, rates
    print(f"{name}/{params['backend']}: fresh {fresh_rate:.3f} float16 {rates['float16']:.3f} "
          f"uint8 {rates['uint8']:.3f}")
