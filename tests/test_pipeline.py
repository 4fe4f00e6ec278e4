"""Generation: stores that verify, determinism, reuse, real Dask clusters, bad input (kills: test_faults.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import config_at, dask_processes, digits_config, shard_sums

from advpipe.config import config_from_dict
from advpipe.errors import ConfigError, ModelError, StoreError
from advpipe.models.checkpoint import load_checkpoint
from advpipe.pipeline.job import generate
from advpipe.stores import open_store, verify_store


def test_generated_store_verifies_and_records_statistics(reference_store, digits_model):
    assert verify_store(reference_store).ok
    store = open_store(reference_store)
    manifest = store.manifest
    assert manifest.variant_names == ["gaussian", "fgsm"]
    assert manifest.model["fingerprint"] == load_checkpoint(digits_model)[1].fingerprint
    assert set(manifest.splits) == {"train", "test"} and manifest.splits["train"].count == 96
    fgsm = manifest.splits["test"].stats["fgsm"]
    assert 0 < fgsm.success_rate <= 1 and fgsm.failed == 0
    assert fgsm.max_linf == pytest.approx(0.1, abs=2e-3)
    assert manifest.splits["train"].stats["gaussian"].mean_l2 > 0
    # success rate recomputed from what the store returns equals the manifest's figure
    model, _ = load_checkpoint(digits_model)
    reader = store.split("test")
    ids = np.arange(len(reader))
    with torch.no_grad():
        clean_pred = model(torch.from_numpy(reader.read(ids, 0))).argmax(1).numpy()
        adv_pred = model(torch.from_numpy(reader.read(ids, store.variant_id("fgsm")))).argmax(1).numpy()
    correct = clean_pred == reader.labels
    assert fgsm.clean_correct == correct.sum()
    assert fgsm.fooled == (correct & (adv_pred != reader.labels)).sum()


def test_same_config_is_up_to_date_and_changed_config_is_refused(tmp_path, digits_model, reference_store):
    config = config_at(tmp_path, digits_model)
    assert generate(config, progress=False).status == "created"
    again = generate(config, progress=False)
    assert again.status == "up-to-date" and again.computed == 0
    changed = config_at(tmp_path, digits_model, variants={"gaussian": {"sigma": 0.1}, "fgsm": {"eps": 0.2}})
    with pytest.raises(StoreError, match="different configuration"):
        generate(changed, progress=False)
    assert shard_sums(tmp_path / "store") == shard_sums(reference_store)
    assert generate(changed, force=True, progress=False).status == "created"


def test_adding_a_variant_computes_only_that_variant(tmp_path, digits_model, reference_store):
    generate(config_at(tmp_path, digits_model, variants={"gaussian": {"sigma": 0.1}}), progress=False)
    before = open_store(tmp_path / "store").split("train").read(np.arange(96), 1)
    outcome = generate(config_at(tmp_path, digits_model), progress=False)
    assert outcome.status == "extended"
    assert open_store(tmp_path / "store").manifest.variant_names == ["gaussian", "fgsm"]
    np.testing.assert_array_equal(open_store(tmp_path / "store").split("train").read(np.arange(96), 1), before)
    assert shard_sums(tmp_path / "store") == shard_sums(reference_store)


def test_one_and_two_worker_processes_give_identical_shards(tmp_path, digits_model, reference_store):
    for workers in (1, 2):
        generate(config_at(tmp_path / f"w{workers}", digits_model), cluster=f"local:{workers}", progress=False)
        assert shard_sums(tmp_path / f"w{workers}" / "store") == shard_sums(reference_store)


def test_real_scheduler_and_two_worker_processes(tmp_path, digits_model, reference_store):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, as on a cluster."""
    with dask_processes(tmp_path, workers=2) as (address, _):
        outcome = generate(config_at(tmp_path, digits_model), scheduler=address, progress=False)
    assert outcome.computed == 6
    assert verify_store(tmp_path / "store").ok
    assert shard_sums(tmp_path / "store") == shard_sums(reference_store)


def no_sbatch(monkeypatch) -> None:
    import shutil

    which = shutil.which
    monkeypatch.setattr("advpipe.pipeline.cluster.shutil.which",
                        lambda name, *args, **kwargs: None if name == "sbatch" else which(name, *args, **kwargs))


def test_slurm_needs_sbatch_on_the_path(monkeypatch):
    from advpipe.pipeline.cluster import check_spec

    no_sbatch(monkeypatch)
    with pytest.raises(ConfigError, match="needs SLURM's `sbatch` on this machine's PATH"):
        check_spec("slurm")
    monkeypatch.setattr("advpipe.pipeline.cluster.shutil.which",
                        lambda name, *args, **kwargs: "/usr/bin/sbatch" if name == "sbatch" else None)
    check_spec("slurm")  # a login node: accepted (nothing is submitted by a check)


def test_slurm_job_script(tmp_path):
    from advpipe.config import SlurmConfig
    from advpipe.pipeline.cluster import slurm_cluster

    slurm = SlurmConfig(queue="gpu", account="advlab", cores=8, processes=4, memory="32GB", walltime="04:00:00",
                        job_extra_directives=["--gres=gpu:1"], job_script_prologue=["module load cuda"])
    with slurm_cluster(slurm) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p gpu" in script and "#SBATCH -A advlab" in script
    assert "#SBATCH -t 04:00:00" in script and "#SBATCH --gres=gpu:1" in script
    assert "module load cuda" in script
    assert "--nworkers 4" in script and "--nthreads 2" in script


@pytest.mark.parametrize("variants,message", [
    ({"fgsm": {"eps": -0.1}}, "eps"),
    ({"fgsm": {"eps": 5.0}}, "eps"),
    ({"fgsm": {"epz": 0.1}}, "unknown parameter 'epz'"),
    ({"mim": {"eps": 0.1}}, "unknown generator 'mim'"),
    ({"fgsm": {"backend": "native"}}, "backend 'native'"),
])
def test_bad_variant_configs_are_refused(tmp_path, variants, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(digits_config(tmp_path, variants=variants))


def test_model_that_does_not_fit_the_data_is_refused(tmp_path, digits_model):
    raw = digits_config(tmp_path, checkpoint=digits_model)
    raw["source"]["image_size"] = 12
    with pytest.raises(ModelError, match="shape"):
        generate(config_from_dict(raw), progress=False)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(Exception, match="train-source"):
        generate(config_from_dict(digits_config(tmp_path)), progress=False)


def test_unwritable_store_directory(tmp_path, digits_model):
    """A store path that cannot be created (here: under a regular file, which stops root too)."""
    (tmp_path / "file").write_text("not a directory")
    raw = digits_config(tmp_path, checkpoint=digits_model)
    raw["store"]["path"] = str(tmp_path / "file" / "store")
    with pytest.raises(StoreError, match="cannot write the store here"):
        generate(config_from_dict(raw), progress=False)


def test_generator_nan_is_recorded_as_failure_not_stored(tmp_path, digits_model, monkeypatch):
    from advpipe.pipeline.generators import REGISTRY

    monkeypatch.setitem(REGISTRY, "flaky", "conftest:FlakyGenerator")
    outcome = generate(config_at(tmp_path, digits_model, variants={"flaky": {}}), progress=False)
    stats = outcome.manifest.splits["train"].stats["flaky"]
    expected = [shard * 32 + row for shard in range(3) for row in range(0, 32, 3)]  # batches of 32
    assert stats.failed == len(expected)
    store = open_store(tmp_path / "store")
    assert np.flatnonzero(store.split("train").failed()[:, 1]).tolist() == expected
    assert np.isfinite(store.split("train").read(np.arange(96), 1)).all()
    assert verify_store(tmp_path / "store").ok


def test_statistics_can_be_switched_off(tmp_path, digits_model, reference_store):
    raw = digits_config(tmp_path, checkpoint=digits_model)
    raw["generation"]["statistics"] = False
    outcome = generate(config_from_dict(raw), progress=False)
    fgsm = outcome.manifest.splits["test"].stats["fgsm"]
    assert fgsm.success_rate is None and fgsm.clean_correct == 0
    assert fgsm.max_linf == pytest.approx(0.1, abs=2e-3)
    assert shard_sums(tmp_path / "store") == shard_sums(reference_store)  # same bytes, fewer figures


def test_a_config_that_is_a_subset_of_the_store_is_up_to_date(tmp_path, digits_model):
    generate(config_at(tmp_path, digits_model), progress=False)
    subset = generate(config_at(tmp_path, digits_model, variants={"fgsm": {"eps": 0.1}}), progress=False)
    assert subset.status == "up-to-date" and subset.manifest.variant_names == ["gaussian", "fgsm"]
    other = config_at(tmp_path, digits_model, variants={"fgsm": {"eps": 0.2}})
    with pytest.raises(StoreError, match="other parameters: fgsm"):
        generate(other, progress=False)


@pytest.mark.parametrize("cluster,device,message", [
    ("lokal:2", None, "lokal:2"),
    ("slurm", None, "needs SLURM's `sbatch`"),
    ("inline", "cuda:999", "cuda:999"),  # an index no machine has, GPU or not
])
def test_bad_cluster_or_device_is_refused_before_anything_is_written(tmp_path, digits_model, cluster, device,
                                                                      message, monkeypatch):
    no_sbatch(monkeypatch)  # as on a laptop, even where SLURM is installed: nothing may be submitted
    with pytest.raises(ConfigError, match=message):
        generate(config_at(tmp_path, digits_model), cluster=cluster, device=device, progress=False)
    assert not (tmp_path / "store").exists()


def test_a_cuda_index_the_machine_lacks_is_refused(monkeypatch):
    """On a machine with two GPUs (simulated here): cuda:1 is used; cuda:2, and indices torch would wrap to 8 bits
    (cuda:256 is torch.device cuda:0, cuda:999 is cuda:-25), are refused."""
    from advpipe.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    for name in ("cuda:2", "cuda:256", "cuda:999"):
        with pytest.raises(ConfigError, match=f"device '{name}' .* has 2 CUDA GPU"):
            resolve_device(name)


def test_force_replaces_an_unreadable_store(tmp_path, digits_model):
    config = config_at(tmp_path, digits_model)
    generate(config, progress=False)
    manifest_path = tmp_path / "store" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"format_version": 3', '"format_version": 1'))
    with pytest.raises(StoreError, match="version 1"):
        generate(config, progress=False)
    assert generate(config, force=True, progress=False).status == "created"
    assert verify_store(tmp_path / "store").ok
