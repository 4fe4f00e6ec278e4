"""A folder of class subfolders of PNG/JPEG files: root/<class_name>/*.png|jpg|jpeg, read lazily.

Classes are the subfolder names, sorted, so the label of a class does not depend
on the order the file system lists them. If root has `train/` and `test/`
subfolders they are the split (classes taken from train/), otherwise the images
form one pool that load_source splits.

The folder is listed (files sorted within each class folder) and indexed in chunks of
files (advpipe.datasets.lazy): each file is read once to hash it and read its header;
images are decoded only when a consumer reads them.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from advpipe.config import SourceConfig
from advpipe.datasets.base import source_path
from advpipe.datasets.lazy import CHUNK, Index, Runner, cached_index, chunk_result, listing_digest, record_image
from advpipe.datasets.transforms import resize_pil
from advpipe.errors import DataError, shorten, shown

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg")
#: the most pixels one image may have, checked from its header before it is decoded: a PNG of zeros
#: compresses about 1000:1, so without a bound a 200 KB file decodes to 200 MB (PIL itself only warns
#: below 89 million pixels)
MAX_IMAGE_PIXELS = 8192 * 8192


def parts(config: SourceConfig, runner: Runner) -> tuple[tuple[str, ...], dict[str, Index]]:
    """(class names, {"train": .., "test": ..} or {"pool": ..}): each part's index, no image decoded."""
    root = source_path(config, "dir").resolve()  # workers and DataLoader processes may start elsewhere
    if (root / "train").is_dir() and (root / "test").is_dir():
        names = class_folders(root / "train")
        return names, {split: index_folder(root, split, names, runner) for split in ("train", "test")}
    names = class_folders(root)
    return names, {"pool": index_folder(root, "", names, runner)}


def class_folders(folder: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise DataError(f"{folder}: no class folders; expected {folder}/<class_name>/*.png|jpg|jpeg")
    return names


def index_folder(root: Path, sub: str, class_names: tuple[str, ...], runner: Runner) -> Index:
    """The index of root/sub's images, in listing order; the files are read once (hashes, headers)."""
    folder = root / sub if sub else root
    files, labels, entries = list_images(folder, class_names)
    prefix = f"{sub}/" if sub else ""
    names = [prefix + name for name in files]
    location = str(root)

    def build() -> Index:
        tasks = [(location, names[start : start + CHUNK], labels[start : start + CHUNK], start)
                 for start in range(0, len(names), CHUNK)]
        chunks = runner(index_files, tasks, f"indexing {folder}")
        return Index.concat(location, names, chunks)

    return cached_index({"format": "imagefolder", "location": location, "part": sub,
                         "listing": listing_digest(entries)}, build)


def index_files(task: tuple[str, list[str], list[int], int]) -> dict[str, np.ndarray]:
    """One index task: hash and read the header of each file of a chunk (runs on a worker)."""
    location, names, labels, first = task
    result = chunk_result(len(names))
    result["container"][:] = np.arange(first, first + len(names))
    result["labels"][:] = labels
    for row, name in enumerate(names):
        path = os.path.join(location, name)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise DataError(f"{path}: cannot read it ({exc.strerror or exc}); the folder changed while it was "
                            "being indexed?") from None
        record_image(result, row, data, path)
    return result


def list_images(folder: Path, class_names: tuple[str, ...]) -> tuple[list[str], list[int], list[tuple]]:
    """Files (relative to `folder`, sorted within each sorted class folder), labels, and (name, size, mtime)."""
    files: list[str] = []
    labels: list[int] = []
    entries: list[tuple] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in class_names:
            raise DataError(
                f"{sub}: class folder '{sub.name}' is not among the training classes "
                f"{shown(list(class_names))}; rename or remove it"
            )
        with os.scandir(sub) as scan:
            images = sorted((e for e in scan if e.is_file() and os.path.splitext(e.name)[1].lower() in SUFFIXES),
                            key=lambda e: e.name)
        for entry in images:
            stat = entry.stat()
            files.append(f"{sub.name}/{entry.name}")
            entries.append((files[-1], stat.st_size, stat.st_mtime_ns))
        labels += [class_names.index(sub.name)] * len(images)
    if not files:
        raise DataError(f"{folder}: no .png/.jpg/.jpeg images in its class folders; the source is empty")
    return files, labels, entries


def image_header(data: bytes | memoryview, where: str) -> tuple[int, int, int]:
    """(width, height, channels after loading) from an image's header, without decoding its pixels."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(where, *image.size)
            return image.size[0], image.size[1], 1 if image.mode == "L" else 3
    except Image.DecompressionBombError as exc:  # PIL's own check, past twice its 89M-pixel warning
        raise DataError(f"{where}: refused: {exc}; is this image a decompression bomb?") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: cannot read the image ({shorten(str(exc))}); replace or remove it") from None


def load_image(file: Path | BinaryIO, size: int | None, where: Any = None) -> np.ndarray:
    """(H, W, 1) for mode L, else (H, W, 3) after converting to RGB; resized if size is set.

    `file` is a path or an open binary stream (`where` names it in errors). The pixel
    count is checked from the header (MAX_IMAGE_PIXELS) before anything is decoded.
    """
    shown_as = file if where is None else where
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own check, past 89M pixels
            with Image.open(file) as image:
                _check_pixels(shown_as, *image.size)
                image.load()
                image = image if image.mode in ("L", "RGB") else image.convert("RGB")
                if size is not None:
                    image = resize_pil(image, size)
                array = np.asarray(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"{shown_as}: refused: {exc}; is this image a decompression bomb?") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{shown_as}: cannot read the image ({shorten(str(exc))}); replace or remove it") from None
    return array[..., None] if array.ndim == 2 else array


def _check_pixels(path: Any, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: image is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} an image may "
                        "have (a decompression bomb?); shrink it or remove it")
