"""One way to open a store loader, from a path or URL: the store's backend picks the reader.

    from advpipe.sampler import open_loader
    loader = open_loader("runs/digits/store", "train", config.sampler, num_workers=2)
    loader = open_loader("https://host/stores/digits-wds", "train", config.sampler, batch_size=256)

HDF5 stores are read map-style (random access, a global shuffle); WebDataset stores are streamed
(shards in order through a shuffle buffer), which suits remote stores. `reader="map"` or
`reader="stream"` overrides the choice where both work.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from advpipe.config import SamplerConfig
from advpipe.errors import SamplerError
from advpipe.sampler.loader import EpochLoader
from advpipe.sampler.mapstyle import make_loader
from advpipe.sampler.streaming import make_stream_loader
from advpipe.stores.backends import backend
from advpipe.stores.source import ShardSource

Reader = Literal["auto", "map", "stream"]


def open_loader(location: str | os.PathLike, split: str = "train", sampler_config: SamplerConfig | None = None, *,
                reader: Reader = "auto", batch_size: int | None = None, num_workers: int = 0,
                rank: int | None = None, world_size: int | None = None, pair_clean: bool | None = None,
                shuffle: bool = True, drop_last: bool = False, pin_memory: bool = False,
                storage_options: dict[str, Any] | None = None, **options: Any) -> EpochLoader:
    """A loader over one split of the store at `location`; every store and policy problem is raised here.

    batch_size defaults to the sampler config's; rank and world_size to torch.distributed's. `options`
    go to the chosen loader (map-style: persistent_workers, verify, cache; streaming: shuffle_buffer, verify,
    prefetch).
    """
    config = sampler_config or SamplerConfig()
    if reader not in ("auto", "map", "stream"):
        raise SamplerError(f"reader must be 'auto', 'map' or 'stream', got {reader!r}")
    manifest = ShardSource(location, storage_options).manifest()
    if reader == "auto":
        reader = "stream" if backend(manifest.backend).streamable else "map"
    common = {"num_workers": num_workers, "rank": rank, "world_size": world_size, "pair_clean": pair_clean,
              "pin_memory": pin_memory, "shuffle": shuffle, "drop_last": drop_last}
    if reader == "stream":
        return make_stream_loader(location, split, config, batch_size=batch_size or config.batch_size,
                                  storage_options=storage_options, **common, **options)
    return make_loader(location, split, config, batch_size=batch_size, storage_options=storage_options, **common,
                       **options)
