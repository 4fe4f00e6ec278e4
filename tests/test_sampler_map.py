"""Map-style sampler: what it yields, reproducibility across workers and processes, frequencies, adaptation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_arrays, write_test_store
from scipy.stats import chisquare

from advpipe.config import SamplerConfig, config_from_dict
from advpipe.errors import ConfigError, IntegrityError, SamplerError
from advpipe.sampler.mapstyle import StoreLoader, build_sampler, make_loader
from advpipe.sampler.policy import Policy
from advpipe.sampler.report import describe_policy, sample_grid
from advpipe.stores import build_store, open_store

ROOT = Path(__file__).resolve().parents[1]
RANGED = {"noise": [0.5, 2.0], "tiny": [1.0, 3.0]}


def policy_config(**overrides) -> SamplerConfig:
    settings = {"ratio": 0.5, "weights": RANGED, "redraw": "batch", "batch_size": 16, "seed": 7}
    return SamplerConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sampler") / "store"
    write_test_store(path)
    return path


def run_epoch(loader: StoreLoader) -> list[dict[str, np.ndarray]]:
    return [{key: value.numpy() for key, value in batch.items()} for batch in loader]


def pairs(batches: list[dict[str, np.ndarray]]) -> list[list[list[int]]]:
    """Each batch as [[index, variant], ...]: the sampler's decisions, comparable across processes."""
    return [np.stack([b["index"], b["variant"]], axis=1).tolist() for b in batches]


# what a batch holds ---------------------------------------------------------------------------------


def test_batches_hold_the_chosen_variants_of_the_chosen_images(store_path):
    reader = open_store(store_path).split("train")
    labels = make_arrays(70, seed=0).labels
    batches = run_epoch(make_loader(store_path, "train", policy_config()))
    for batch in batches:
        assert batch["x"].dtype == np.float32 and batch["x"].shape == (len(batch["index"]), 3, 8, 8)
        assert batch["y"].dtype == batch["variant"].dtype == batch["index"].dtype == np.int64
        assert batch["is_adv"].dtype == bool
        np.testing.assert_array_equal(batch["x"], reader.read(batch["index"], batch["variant"]))
        np.testing.assert_array_equal(batch["y"], labels[batch["index"]])
        np.testing.assert_array_equal(batch["is_adv"], batch["variant"] > 0)
        assert batch["x"].min() >= 0 and batch["x"].max() <= 1
    variants = np.concatenate([b["variant"] for b in batches])
    assert set(variants.tolist()) == {0, 1, 2}
    assert [len(b["index"]) for b in batches] == [16, 16, 16, 16, 6]


@pytest.mark.parametrize(("backend", "compression"), [("hdf5", "gzip"), ("webdataset", None)])
def test_other_layouts_read_in_workers(tmp_path, backend, compression):
    write_test_store(tmp_path / "s", backend=backend, compression=compression)
    reader = open_store(tmp_path / "s").split("train")
    batches = run_epoch(make_loader(tmp_path / "s", "train", policy_config(), num_workers=2))
    assert sum(len(b["index"]) for b in batches) == 70
    for batch in batches:
        np.testing.assert_array_equal(batch["x"], reader.read(batch["index"], batch["variant"]))


def test_pair_clean_yields_the_clean_twin(store_path):
    reader = open_store(store_path).split("train")
    for batch in run_epoch(make_loader(store_path, "train", policy_config(), pair_clean=True)):
        np.testing.assert_array_equal(batch["x_clean"], reader.read(batch["index"], 0))
        np.testing.assert_array_equal(batch["x"], reader.read(batch["index"], batch["variant"]))
    assert "x_clean" not in next(iter(make_loader(store_path, "train", policy_config())))


def test_every_image_is_read_once_per_epoch(store_path):
    loader = make_loader(store_path, "train", policy_config())
    for _ in range(2):
        indices = np.concatenate([b["index"] for b in run_epoch(loader)])
        assert sorted(indices.tolist()) == list(range(70))
    dropped = np.concatenate([b["index"] for b in run_epoch(make_loader(store_path, "train", policy_config(),
                                                                        drop_last=True))])
    assert len(dropped) == 64 and len(set(dropped.tolist())) == 64


def test_two_ranks_partition_the_epoch_and_agree_with_one_rank(store_path):
    config = policy_config(redraw="sample")
    ranks = [run_epoch(make_loader(store_path, "train", config, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    seen = [np.concatenate([b["index"] for b in batches]) for batches in ranks]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(np.concatenate(seen).tolist()) == list(range(70))
    choices = {i: v for batches in ranks for b in batches for i, v in zip(b["index"], b["variant"], strict=True)}
    single = {i: v for b in run_epoch(make_loader(store_path, "train", config))
              for i, v in zip(b["index"], b["variant"], strict=True)}
    assert choices == single


# reproducibility and resumption ---------------------------------------------------------------------


def test_sequence_is_the_same_whatever_the_workers(store_path):
    def two_epochs(**options) -> list[dict[str, np.ndarray]]:
        loader = make_loader(store_path, "train", policy_config(), **options)
        return run_epoch(loader) + run_epoch(loader)

    reference = two_epochs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pin_memory without an accelerator
        for options in ({"num_workers": 1}, {"num_workers": 2},
                        {"num_workers": 2, "persistent_workers": True, "pin_memory": True}):
            other = two_epochs(**options)
            assert pairs(other) == pairs(reference), options
            for mine, theirs in zip(other, reference, strict=True):
                np.testing.assert_array_equal(mine["x"], theirs["x"])


def test_epochs_and_seeds_give_different_sequences(store_path):
    loader = make_loader(store_path, "train", policy_config())
    first, second = pairs(run_epoch(loader)), pairs(run_epoch(loader))
    assert first != second
    assert pairs(run_epoch(make_loader(store_path, "train", policy_config(seed=8)))) != first


RESUME_SCRIPT = """
import json, sys
from advpipe.config import SamplerConfig
from advpipe.sampler.mapstyle import make_loader

store, config, state = sys.argv[1], json.loads(sys.argv[2]), json.loads(open(sys.argv[3]).read())
loader = make_loader(store, "train", SamplerConfig.model_validate(config), num_workers=1)
loader.load_state_dict(state)
rest = [[list(p) for p in zip(b["index"].tolist(), b["variant"].tolist())] for b in loader]
counts = loader.epoch_counts
following = [[list(p) for p in zip(b["index"].tolist(), b["variant"].tolist())] for b in loader]
print(json.dumps({"rest": rest, "counts": counts, "following": following}))
"""


def test_resume_mid_epoch_in_a_new_process(store_path, tmp_path):
    config = policy_config(adaptive=True, adapt_rate=0.8)
    consumed = 3

    def first_epochs(loader: StoreLoader) -> list[dict[str, np.ndarray]]:
        """Epoch 0, an update, then epoch 1 with another update after `consumed` batches (pending at save)."""
        run_epoch(loader)
        loader.update({"noise": 0.9, "tiny": 0.1})
        taken = []
        for batch in loader:
            taken.append({key: value.numpy() for key, value in batch.items()})
            if len(taken) == consumed:
                loader.update({"noise": 0.1, "tiny": 0.7})
                break
        return taken

    uninterrupted = make_loader(store_path, "train", config, num_workers=2)
    first_epochs(uninterrupted)
    rest = run_epoch(uninterrupted)
    counts = uninterrupted.epoch_counts
    following = run_epoch(uninterrupted)

    interrupted = make_loader(store_path, "train", config, num_workers=2)
    first_epochs(interrupted)
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(interrupted.state_dict()))
    (tmp_path / "resume.py").write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(tmp_path / "resume.py"), str(store_path),
                           json.dumps(config.model_dump(mode="json")), str(state_file)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    resumed = json.loads(done.stdout)
    assert len(rest) == 5 - consumed
    assert resumed["rest"] == pairs(rest)
    assert resumed["counts"] == counts
    assert resumed["following"] == pairs(following)


def test_saved_state_must_fit_the_loader(store_path):
    state = make_loader(store_path, "train", policy_config()).state_dict()
    with pytest.raises(SamplerError, match="batch_size is 8, saved 16"):
        make_loader(store_path, "train", policy_config(), batch_size=8).load_state_dict(state)


# frequencies ------------------------------------------------------------------------------------------


def test_realised_frequencies_match_a_fixed_policy(store_path, caplog):
    config = policy_config(ratio=0.4, weights={"noise": 1, "tiny": 3}, redraw="epoch", batch_size=35)
    loader = make_loader(store_path, "train", config)
    expected = loader.policy.expected_frequencies()
    assert expected == pytest.approx({"clean": 0.6, "noise": 0.1, "tiny": 0.3})
    observed = np.zeros(3)
    with caplog.at_level(logging.INFO, logger="advpipe.sampler.loader"):
        for _ in range(60):
            run_epoch(loader)
            observed += list(loader.epoch_counts.values())
    assert chisquare(observed, np.array(list(expected.values())) * observed.sum()).pvalue > 0.001
    assert "sampler epoch 59: realised variant counts" in caplog.text
    metrics = loader.metrics()
    assert [metrics[f"sampler/{n}"] for n in ("clean", "noise", "tiny")] == list(loader.epoch_counts.values())
    assert sum(loader.epoch_counts.values()) == 70


def test_realised_frequencies_match_a_ranged_policy(store_path):
    config = policy_config(ratio=[0.2, 0.8], redraw="sample")
    sampler = build_sampler(open_store(store_path), "train", config, batch_size=70)
    observed = np.zeros(3)
    for epoch in range(150):
        sampler.set_epoch(epoch)
        for batch in sampler:
            observed += np.bincount([variant for _, variant in batch], minlength=3)
    expected = np.array(list(sampler.policy.expected_frequencies().values()))
    assert chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 0.001


# adaptive mode ----------------------------------------------------------------------------------------


def test_adaptive_weights_never_leave_their_ranges():
    policy = Policy.from_config(policy_config(adaptive=True, adapt_rate=1.0, redraw="sample"),
                                ["clean", "noise", "tiny"])
    lo, hi = np.array([0.5, 1.0]), np.array([2.0, 3.0])
    before = policy.expected_frequencies()
    for errors in ({"noise": 1.0, "tiny": 0.0}, {"noise": 0.0, "tiny": 5.0}, {"noise": 1e6, "tiny": 1e-9},
                   {"noise": 0.3}, {"noise": 0.0, "tiny": 0.0}):
        policy.update(errors)
        policy.adapt()
        raw = policy.raw_weights(0, np.arange(2000))
        assert (raw >= lo).all() and (raw <= hi).all(), errors
    policy.update({"noise": 1.0, "tiny": 0.1})
    policy.adapt()
    after = policy.expected_frequencies()
    assert after["noise"] > before["noise"] and after["tiny"] < before["tiny"]
    assert after["clean"] == before["clean"]


def test_adaptive_updates_are_deterministic_and_apply_at_the_next_epoch(store_path):
    config = policy_config(adaptive=True)

    def run(update: bool) -> tuple[list, float]:
        loader = make_loader(store_path, "train", config)
        epochs = []
        for _ in range(3):
            batches = []
            for batch in loader:
                batches.append({key: value.numpy() for key, value in batch.items()})
                if update and len(batches) == 2:  # mid-epoch: must not change the rest of this epoch
                    loader.update({"noise": 0.8, "tiny": 0.05})
            epochs.append(pairs(batches))
        return epochs, loader.policy.expected_frequencies()["noise"]

    (updated, noise), (again, _), (plain, plain_noise) = run(True), run(True), run(False)
    assert updated == again
    assert updated[0] == plain[0]  # the update made during epoch 0 left epoch 0 alone
    assert updated[1] != plain[1]
    assert noise > plain_noise


def test_adaptive_with_fixed_weights_is_refused(store_path):
    """Adaptation moves draws inside ranges; with lo == hi everywhere it would silently do nothing."""
    with pytest.raises(SamplerError, match="adaptive: true would change nothing"):
        make_loader(store_path, "train", policy_config(adaptive=True, weights={"noise": 1, "tiny": 1}))
    with pytest.raises(SamplerError, match="adaptive: true would change nothing"):
        make_loader(store_path, "train", policy_config(adaptive=True, weights={}))


def test_clean_error_stays_out_of_the_normalisation():
    """A large clean error must not shrink every variant's relative error."""
    def centres(errors: dict[str, float]) -> list[float]:
        policy = Policy.from_config(policy_config(adaptive=True, adapt_rate=1.0), ["clean", "noise", "tiny"])
        policy.update(errors)
        policy.adapt()
        return policy.centres.tolist()

    assert centres({"clean": 10.0, "noise": 0.4, "tiny": 0.2}) == [1.0, 0.5]
    assert centres({"clean": 10.0, "noise": 0.4, "tiny": 0.2}) == centres({"noise": 0.4, "tiny": 0.2})


# failed variants and bad input -----------------------------------------------------------------------


def test_failed_variants_are_never_chosen(tmp_path):
    arrays = make_arrays(40)
    arrays.variants["noise"][[2, 5]] = np.nan
    arrays.variants["tiny"][[5, 7]] = np.nan
    build_store(tmp_path / "s", {"train": arrays}, class_names=CLASSES, shard_size=16, progress=False)
    sampler = build_sampler(open_store(tmp_path / "s"), "train", policy_config(ratio=1.0, redraw="sample"))
    chosen: dict[int, set[int]] = {}
    for epoch in range(30):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for index, variant in batch:
                chosen.setdefault(index, set()).add(variant)
    assert chosen[2] == {2} and chosen[5] == {0} and chosen[7] == {1}
    assert all(chosen[i] == {1, 2} for i in range(40) if i not in (2, 5, 7))


@pytest.mark.parametrize(("weights", "groups", "message"), [
    ({"fgsm": 1}, {}, "unknown variant or group 'fgsm'"),
    ({"attacks": 1}, {"attacks": ["noise", "pgd"]}, "group 'attacks' names variant.* the store does not have: pgd"),
    ({"noise": 0, "tiny": 0}, {}, "every variant weight is zero"),
])
def test_bad_policy_fails_when_the_loader_is_built(store_path, weights, groups, message):
    with pytest.raises(SamplerError, match=message):
        make_loader(store_path, "train", policy_config(weights=weights, groups=groups))


@pytest.mark.parametrize(("sampler", "key", "message"), [
    ({"ratio": [0.6, 0.2]}, "sampler.ratio", "lo > hi"),
    ({"weights": {"noise": [2, 1]}}, "sampler.weights.noise", "lo > hi"),
    ({"weights": {"noise": -1}}, "sampler.weights.noise", "must not be negative"),
])
def test_bad_values_fail_config_validation(sampler, key, message):
    with pytest.raises(ConfigError, match=f"'{key}'.*{message}"):
        config_from_dict({"sampler": sampler})


def test_bad_layout_fails_at_build(store_path):
    with pytest.raises(SamplerError, match="rank 2 is not valid for world_size 2"):
        make_loader(store_path, "train", policy_config(), rank=2, world_size=2)
    with pytest.raises(SamplerError, match="no batch of 100"):
        make_loader(store_path, "train", policy_config(), batch_size=100, drop_last=True)


def test_corrupt_shard_fails_at_build_naming_it(tmp_path):
    write_test_store(tmp_path / "s")
    shard = tmp_path / "s" / "train" / "train-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="train/train-00001.h5"):
        make_loader(tmp_path / "s", "train", policy_config())
    make_loader(tmp_path / "s", "train", policy_config(), verify="size")  # sizes only: the caller's choice


# report -------------------------------------------------------------------------------------------------


def test_describe_policy_tabulates_expected_and_realised(store_path):
    text = describe_policy(store_path, "train", policy_config(ratio=[0.3, 0.6]), batches=12)
    assert "12 batches drawn (172 samples, 3 epoch(s))" in text
    assert "redraw per batch" in text and "adversarial ratio [0.3, 0.6]" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:6]}
    assert set(rows) == {"clean", "noise", "tiny"}
    assert rows["noise"][1:3] == ["[0.5,", "2]"]
    assert sum(int(row[-1]) for row in rows.values()) == 172
    assert "adversarial fraction per batch: min" in text


def test_sample_grid_draws_a_batch(store_path, tmp_path):
    from PIL import Image

    out = sample_grid(store_path, "train", policy_config(), tmp_path / "grid" / "batch.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (1280, 360)  # a batch of 16: two rows of 8
        pixels = np.asarray(picture.convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # images were drawn, not an empty canvas


def test_scenario_shifts_are_not_in_the_default_mix(tmp_path):
    from advpipe.sampler.policy import Policy, scenario_variants
    from advpipe.stores import read_manifest

    arrays = make_arrays(8, variants=("noise", "tiny"))
    arrays.variants = {"fgsm": arrays.variants["noise"], "rot": arrays.variants["tiny"]}
    build_store(tmp_path / "s", {"train": arrays}, class_names=CLASSES, progress=False,
                variant_params={"rot": {"generator": "turn", "kind": "shift"}})
    scenario = scenario_variants(read_manifest(tmp_path / "s"))  # the manifest's kind, not a list of generators
    assert scenario == {"rot"}
    raw = json.loads((tmp_path / "s/manifest.json").read_text())  # a version 2 manifest has no kinds:
    raw["format_version"] = 2  # the generator name decides (b1, b2 are shifts)
    raw["variants"] = [{k: v[k] for k in ("name", "generator", "backend", "params", "fingerprint")}
                       | ({"generator": "b1"} if v["name"] == "rot" else {}) for v in raw["variants"]]
    (tmp_path / "s/manifest.json").write_text(json.dumps(raw))
    assert scenario_variants(read_manifest(tmp_path / "s")) == {"rot"}
    assert Policy.from_config(SamplerConfig(), ["clean", "fgsm", "rot"], scenario).names == ["fgsm"]
    named = SamplerConfig(weights={"fgsm": 1, "rot": 1})
    assert Policy.from_config(named, ["clean", "fgsm", "rot"], scenario).names == ["fgsm", "rot"]


def test_adaptive_policy_starts_from_the_whole_range():
    from advpipe.sampler.policy import Policy

    config = SamplerConfig(weights={"noise": [1, 3], "tiny": [1, 3]}, adaptive=True, redraw="sample")
    policy = Policy.from_config(config, ["clean", "noise", "tiny"])
    weights = policy.raw_weights(0, np.arange(20000))
    assert weights.min() < 1.05 and weights.max() > 2.95  # the whole [1, 3], like a non-adaptive policy
    policy.update({"noise": 1.0, "tiny": 0.0})
    for _ in range(10):
        policy.update({"noise": 1.0, "tiny": 0.0})
        policy.adapt()
    weights = policy.raw_weights(1, np.arange(20000))
    assert weights[:, 0].min() >= 1.99 and weights[:, 0].max() <= 3.0   # upper half, still random
    assert weights[:, 1].min() >= 1.0 and weights[:, 1].max() <= 2.01  # lower half
    assert weights[:, 0].std() > 0.1
