"""The on-disk store: sharded HDF5 or WebDataset files plus a manifest (docs/FORMAT.md).

    from advpipe.stores import open_store
    store = open_store("runs/digits/store")
    train = store.split("train")
    x = train.read([0, 1, 2], store.variant_id("fgsm"))   # float32 (3, C, H, W) in [0, 1]
"""

from advpipe.stores.build import SplitArrays, build_store, convert_store
from advpipe.stores.manifest import Manifest, read_manifest
from advpipe.stores.store import SplitReader, Store, open_store
from advpipe.stores.verify import verify_store

__all__ = ["Manifest", "SplitArrays", "SplitReader", "Store", "build_store", "convert_store", "open_store",
           "read_manifest", "verify_store"]
