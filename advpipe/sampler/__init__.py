"""The dynamic-probability sampler: per drawn image, clean or one stored variant.

`policy` holds the math (METHODS.md section 2); `loader` the base every loader
shares (epochs, counts, adaptive updates, resumption); `mapstyle` reads any store
by random access (HDF5 is the fast path); `streaming` reads WebDataset shards in
order, locally or from any URL; `factory.open_loader` picks one from the store;
`report` shows a person what a policy yields.

    from advpipe.sampler import open_loader
    loader = open_loader("runs/digits/store", "train", config.sampler, num_workers=2)
    for batch in loader:            # one epoch of advpipe.batch.Batch: x, y, variant, index (, x_clean)
        ...
    loader.update({"fgsm": 0.4, "cw": 0.1})   # adaptive mode: applied at the next epoch
"""

from advpipe.sampler.factory import open_loader
from advpipe.sampler.loader import EpochLoader
from advpipe.sampler.mapstyle import StoreLoader, make_loader
from advpipe.sampler.policy import Policy, resolve_weights, uniforms
from advpipe.sampler.streaming import StreamLoader, make_stream_loader

__all__ = ["EpochLoader", "Policy", "StoreLoader", "StreamLoader", "make_loader", "make_stream_loader",
           "open_loader", "resolve_weights", "uniforms"]
