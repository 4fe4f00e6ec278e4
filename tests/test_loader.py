"""What both store loaders share: the factory, resumption at an epoch boundary, adaptive updates across ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import write_test_store

from advpipe.batch import Batch
from advpipe.config import SamplerConfig
from advpipe.errors import SamplerError, StoreError
from advpipe.sampler import StoreLoader, StreamLoader, open_loader

ROOT = Path(__file__).resolve().parents[1]
POLICY = SamplerConfig(ratio=(0.3, 0.7), weights={"noise": (0.5, 2.0), "tiny": (1.0, 3.0)}, redraw="batch", seed=4,
                       batch_size=16)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loaders")
    write_test_store(root / "hdf5", backend="hdf5", shard_size=16, count=70)
    write_test_store(root / "webdataset", backend="webdataset", shard_size=16, count=70)
    return {"hdf5": root / "hdf5", "webdataset": root / "webdataset"}


def test_the_factory_picks_the_reader_from_the_store(stores: dict[str, Path]) -> None:
    assert isinstance(open_loader(stores["hdf5"], "train", POLICY), StoreLoader)
    assert isinstance(open_loader(stores["webdataset"], "train", POLICY), StreamLoader)
    assert isinstance(open_loader(stores["webdataset"], "train", POLICY, reader="map"), StoreLoader)
    batch = next(iter(open_loader(stores["webdataset"], "test", POLICY, batch_size=8)))
    assert isinstance(batch, Batch) and len(batch) == 8
    with pytest.raises(StoreError, match="not a finished store"):
        open_loader(stores["hdf5"] / "train", "train", POLICY)
    with pytest.raises(SamplerError, match="reader must be"):
        open_loader(stores["hdf5"], "train", POLICY, reader="random")


RESUME = textwrap.dedent("""
    import json, sys
    from advpipe.config import SamplerConfig
    from advpipe.sampler import open_loader
    location, state = sys.argv[1], json.loads(sys.argv[2])
    policy = SamplerConfig.model_validate(json.loads(sys.argv[3]))
    loader = open_loader(location, "train", policy, num_workers=1)
    loader.load_state_dict(state)
    epochs = [[batch.index.tolist() + batch.variant.tolist() for batch in loader] for _ in range(2)]
    print(json.dumps({"epochs": epochs, "epoch": loader.epoch}))
""")


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_a_state_saved_at_the_end_of_an_epoch_resumes_with_the_next_epoch(
        stores: dict[str, Path], backend: str, tmp_path: Path) -> None:
    """Saving after a full pass is the common case: the resumed loader must yield the next epoch whole."""
    def run(loader) -> list[list[int]]:
        return [batch.index.tolist() + batch.variant.tolist() for batch in loader]

    loader = open_loader(stores[backend], "train", POLICY, num_workers=1)
    first = run(loader)
    loader.update({"noise": 0.9, "tiny": 0.1})  # adaptive state must survive too (applied at epoch 1)
    state = loader.state_dict()
    expected = [run(loader), run(loader)]
    assert state["epoch"] == 1 and state["batches_consumed"] == 0 and len(first) == len(loader) == 5
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    result = subprocess.run([sys.executable, str(script), str(stores[backend]), json.dumps(state),
                             POLICY.model_dump_json()], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    resumed = json.loads(result.stdout.strip().splitlines()[-1])
    assert resumed["epochs"] == expected and resumed["epoch"] == 3
    assert expected[0] != first  # the next epoch really is another epoch


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_a_consumer_that_stops_after_the_last_batch_starts_the_next_epoch(stores: dict[str, Path],
                                                                          backend: str) -> None:
    loader = open_loader(stores[backend], "train", POLICY)
    iterator = iter(loader)
    taken = [next(iterator) for _ in range(len(loader))]  # every batch, but the pass is not run to its end
    state = loader.state_dict()
    assert state["batches_consumed"] == len(loader) and len(taken) == len(loader)
    again = open_loader(stores[backend], "train", POLICY)
    again.load_state_dict(state)
    assert len(list(again)) == len(loader) and again.epoch == 2
    with pytest.raises(SamplerError, match="past the end of an epoch"):
        again.load_state_dict({**state, "batches_consumed": len(loader) + 1})


DDP = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from advpipe.config import SamplerConfig
    from advpipe.sampler import open_loader
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = SamplerConfig.model_validate(json.loads(sys.argv[2]))
    loader = open_loader(sys.argv[1], "train", policy)  # rank and world size from torch.distributed
    errors = [{"noise": 0.8, "tiny": 0.2, "clean": 0.5}, {"noise": 0.4}][rank]
    loader.update(errors)
    list(loader)
    list(loader)  # the update applies when epoch 1 starts
    print(json.dumps({"rank": rank, "centres": loader.policy.centres.tolist(), "batches": len(loader)}))
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_adaptive_updates_are_averaged_over_ranks(stores: dict[str, Path], tmp_path: Path) -> None:
    """Two gloo processes report different errors; both must end with the policy of the averaged errors."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    policy = POLICY.model_copy(update={"adaptive": True, "adapt_rate": 1.0})
    for _attempt in range(3):  # a port found free can be taken before the rendezvous binds it: retry then
        port = free_port()
        processes = [subprocess.Popen(
            [sys.executable, str(script), str(stores["hdf5"]), policy.model_dump_json()], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for rank in range(2)]
        outputs = [process.communicate(timeout=300) for process in processes]
        if all(process.returncode == 0 for process in processes):
            break
        if not any("address already in use" in err.lower() for _, err in outputs):
            break
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # averaged: noise (0.8 + 0.4) / 2 = 0.6, tiny 0.2 (only rank 0 reported it); normalised by the top, 0.6
    for result in results:
        assert result["centres"] == pytest.approx([1.0, 0.2 / 0.6])
    assert results[0]["batches"] == results[1]["batches"]
