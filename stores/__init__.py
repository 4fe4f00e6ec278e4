"""The on-disk store: sharded HDF5 or WebDataset files plus a manifest (docs/FORMAT.md).

    from advpipe.stores import open_store
    store = open_store("runs/digits/store")            # or any fsspec URL: "http://host/stores/digits"
    train = store.split("train")
    x = train.read([0, 1, 2], store.variant_id("fgsm"))   # float32 (3, C, H, W) in [0, 1]

Everything about the format lives in this package: the manifest (`manifest`), precision modes
(`codec`), stacked arrays and the shard reader protocol (`shard`), the backends (`backends`:
`hdf5`, `wds` with the tar parser `tar`), fetching and checking shards (`source`), reading
(`store`), writing (`writer`, `build`) and statistics (`stats`).
"""

from advpipe.stores.build import SplitArrays, build_store, convert_store
from advpipe.stores.manifest import Manifest, read_manifest
from advpipe.stores.source import ShardSource
from advpipe.stores.store import SplitReader, Store, open_store
from advpipe.stores.verify import verify_store
from advpipe.stores.writer import StoreWriter

__all__ = ["Manifest", "ShardSource", "SplitArrays", "SplitReader", "Store", "StoreWriter", "build_store",
           "convert_store", "open_store", "read_manifest", "verify_store"]
