"""WebDataset shards as a source: tar files of <key>.jpg|jpeg|png|webp with <key>.cls (or .json), read lazily.

`source.path` is a WebDataset brace pattern ("s3://bucket/imagenet/train-{000000..001281}.tar"), one
.tar, or a directory (or object-storage prefix) whose *.tar files are the shards; with `train/` and
`test/` subfolders these are the split. `source.test_path` names a predefined test split's shards the
same ways; without either, the shards form one pool that load_source splits. Any location the
stores accept: a local path, `s3://` (endpoint and options as `source.endpoint_url` and
`source.storage_options`), `http(s)://` (patterns only: the web cannot be listed).

Samples follow the WebDataset convention: members are grouped by key (the member name up to the first
dot of its last path component), and a sample's members are consecutive. A sample's image is its
first .jpg/.jpeg/.png/.webp member; its label is the ASCII integer of its .cls member or the key KEY
of its .json member (`source.label: json:KEY`); other members are ignored. Class names come from
`source.class_names`, else '0', '1', ... up to the largest label.

Indexing reads each shard once, one task per shard (advpipe.datasets.lazy); afterwards an image is a
single range read of its own bytes. webdataset's `wids` indexed reader is not used: the installed
webdataset (1.x) no longer ships it, and it fetches whole shards into a local cache where a range
read of one member is all a store shard needs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from braceexpand import braceexpand

from advpipe import urls
from advpipe.config import SourceConfig
from advpipe.datasets.lazy import (
    Index,
    Runner,
    cached_index,
    check_labels,
    chunk_result,
    filesystem,
    listing_digest,
    read_bytes,
    record_image,
)
from advpipe.errors import DataError, IntegrityError, SourceChangedError, shorten, shown
from advpipe.stores.tar import iter_spans

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: (key, extension)
#: the most characters of a .cls member or a .json label member worth reading
MAX_LABEL_BYTES = 1 << 16


def parts(config: SourceConfig, runner: Runner) -> tuple[tuple[str, ...], dict[str, Index]]:
    """(class names, {"train": .., "test": ..} or {"pool": ..}): each part's index; every shard read once."""
    options = urls.storage_options(str(config.path), config.storage_options, config.endpoint_url)
    if config.test_path is not None:
        patterns = {"train": config.path, "test": config.test_path}
    else:
        patterns = _split_folders(str(config.path), options) or {"pool": config.path}
    indexes = {part: index_shards(str(pattern), options, config.label, runner) for part, pattern in patterns.items()}
    top = max(int(index.labels.max()) for index in indexes.values())
    names = tuple(config.class_names) if config.class_names else tuple(str(label) for label in range(top + 1))
    for index in indexes.values():
        check_labels(index, len(names))
    return names, indexes


def _split_folders(location: str, options: dict[str, Any]) -> dict[str, str] | None:
    """{"train": location/train, "test": location/test} when a directory holds both, else None."""
    if location.endswith(".tar") or "{" in location or urls.protocol(location) in urls.READ_ONLY_PROTOCOLS:
        return None
    fs, base = filesystem(location, options)
    found = {split: f"{location.rstrip('/')}/{split}" for split in ("train", "test")}
    return found if all(fs.isdir(f"{base}/{split}") for split in found) else None


def index_shards(pattern: str, options: dict[str, Any], label: str, runner: Runner) -> Index:
    """The index of every image in the shards `pattern` names, in shard and member order."""
    location, names = list_shards(pattern, options)
    fs, base = filesystem(location, options)
    entries = []
    for name in names:
        try:
            info = fs.info(f"{base}/{name}")
        except (OSError, ValueError) as exc:
            raise DataError(f"{urls.redact(location)}/{name}: cannot reach this shard ({shorten(urls.redact(exc))}); "
                            "check source.path and that the source is reachable from here") from None
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        entries.append((name, info.get("size") or 0, version))

    def build() -> Index:
        tasks = [(location, options, name, row, label) for row, name in enumerate(names)]
        chunks = runner(index_shard, tasks, f"indexing {len(names)} shard(s) at {urls.redact(location)}")
        return Index.concat(location, names, chunks)

    return cached_index({"format": "webdataset", "location": location, "label": label,
                         "listing": listing_digest(entries)}, build)


def list_shards(pattern: str, options: dict[str, Any]) -> tuple[str, list[str]]:
    """(the shards' common directory, their names relative to it), sorted within a directory listing."""
    expanded = list(braceexpand(pattern))
    if len(expanded) == 1 and not expanded[0].endswith(".tar"):
        directory = expanded[0].rstrip("/")
        if urls.protocol(directory) in urls.READ_ONLY_PROTOCOLS:
            raise DataError(f"{urls.redact(directory)}: a web location cannot be listed; give the shards as a "
                            "brace pattern, e.g. https://host/data/train-{000000..000099}.tar")
        if not urls.is_remote(directory):
            directory = os.path.abspath(directory)
        fs, base = filesystem(directory, options)
        try:
            found = sorted(path.rsplit("/", 1)[-1] for path in fs.glob(f"{base}/*.tar"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{urls.redact(directory)}: cannot list it ({shorten(urls.redact(exc))}); check "
                            "source.path") from None
        if not found:
            raise DataError(f"{urls.redact(directory)}: no .tar shards here; point source.path at WebDataset shards "
                            "(a directory of .tar files or a brace pattern)")
        return directory, found
    if not urls.is_remote(expanded[0]):
        expanded = [os.path.abspath(path) for path in expanded]
    location = _common_directory(expanded)
    return location, [path[len(location) + 1 :] for path in expanded]


def _common_directory(locations: list[str]) -> str:
    """The longest directory prefix (up to a '/') that every URL shares."""
    prefix = os.path.commonprefix([loc.rsplit("/", 1)[0] + "/" for loc in locations])
    return prefix[: prefix.rindex("/")]


def index_shard(task: tuple[str, dict[str, Any], str, int, str]) -> dict[str, np.ndarray]:
    """One index task: read a shard once; per sample the image's span, sha256, header and label."""
    location, options, name, row, label = task
    where = f"{urls.redact(location)}/{name}"
    data = read_bytes(location, options, name)
    try:
        samples = _samples(data, where)
    except IntegrityError as exc:
        raise SourceChangedError(str(exc)) from None
    if not samples:
        raise DataError(f"{where}: no samples in this shard; is it a WebDataset shard?")
    result = chunk_result(len(samples))
    result["container"][:] = row
    result["names"] = np.array([image[0].encode() for _, image, _ in samples], dtype=bytes)
    view = memoryview(data)
    for i, (key, (member, start, size), members) in enumerate(samples):
        result["offset"][i] = start
        record_image(result, i, view[start : start + size], f"{where}, member {member}")
        result["labels"][i] = _label(view, members, label, f"{where}, sample {key}")
    return result


def _samples(data: bytes, where: str) -> list[tuple[str, tuple[str, int, int], dict[str, tuple[int, int]]]]:
    """(key, (image member, offset, size), {extension: (offset, size)}) per sample, in shard order."""
    groups: list[tuple[str, dict[str, tuple[int, int, str]]]] = []
    for member, start, size in iter_spans(data, where):
        match = _KEY.match(member)
        if match is None:
            continue  # a member without an extension belongs to no sample
        key, extension = match.group(1), match.group(2).lower()
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        groups[-1][1].setdefault(extension, (start, size, member))
    return [_sample(key, members, where) for key, members in groups]


def _sample(key: str, members: dict[str, tuple[int, int, str]], where: str) -> tuple:
    images = [ext for ext in members if ext in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"{where}, sample {key}: no image member (.jpg/.jpeg/.png/.webp), only "
                        f"{shown(sorted(members))}; every sample needs one image")
    start, size, member = members[images[0]]
    return key, (member, start, size), {ext: (s, n) for ext, (s, n, _) in members.items()}


def _label(view: memoryview, members: dict[str, tuple[int, int]], label: str, where: str) -> int:
    """The sample's label from its .cls member (an ASCII integer) or from KEY of its .json member."""
    extension, _, key = label.partition(":")
    if extension not in members:
        raise DataError(f"{where}: no .{extension} member (the label); every sample needs one, or set "
                        "source.label (cls, or json:KEY)")
    start, size = members[extension]
    text = bytes(view[start : start + min(size, MAX_LABEL_BYTES)]).decode("utf-8", "replace").strip()
    value: Any = text
    if key:
        try:
            value = json.loads(text)[key]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{where}: its .json member has no label under '{key}' ({shorten(text)})") from None
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise DataError(f"{where}: label {shown(value)} is not a non-negative integer class index")
    return int(value)
