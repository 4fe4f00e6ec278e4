"""The dynamic-probability sampler: per drawn image, clean or one stored variant.

`policy` holds the math (METHODS.md section 2); `mapstyle` reads any store by
random access (HDF5 is the fast path); `streaming` reads WebDataset shards in
order, locally or from any URL.
"""

from advpipe.sampler.policy import Policy, resolve_weights, uniforms

__all__ = ["Policy", "resolve_weights", "uniforms"]
