"""advpipe: precomputed adversarial variants in sharded stores, fed to robust training.

The pieces, in the order data flows through them:

- `advpipe.datasets`: source images (uint8, NHWC) with labels and a content fingerprint;
- `advpipe.models`: source classifiers taking [0, 1] inputs, with checkpoints;
- `pipeline`: generators (one per variant) and the Dask job that fills a store;
- `stores`: the on-disk format (HDF5 or WebDataset shards plus a manifest);
- `advpipe.sampler`: the dynamic-probability sampler that reads a store for training;
- `trainers`: one shared training loop and one module per method.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
