"""Generation pipeline: configs in, one Dask task per shard out, each writing every variant of its images."""
