"""The dynamic-probability sampler: per drawn image, clean or one stored variant.

`policy` holds the math (METHODS.md section 2); `mapstyle` reads any store by
random access (HDF5 is the fast path); `streaming` reads WebDataset shards in
order, locally or from any URL; `report` shows a person what a policy yields.

    from advpipe.sampler import make_loader
    loader = make_loader("runs/digits/store", "train", config.sampler, num_workers=2)
    for batch in loader:            # one epoch; batch["x"], ["y"], ["variant"], ["is_adv"]
        ...
    loader.update({"fgsm": 0.4, "cw": 0.1})   # adaptive mode: applied at the next epoch
"""

from advpipe.sampler.mapstyle import StoreLoader, make_loader
from advpipe.sampler.policy import Policy, resolve_weights, uniforms

__all__ = ["Policy", "StoreLoader", "make_loader", "resolve_weights", "uniforms"]
