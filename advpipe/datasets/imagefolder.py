"""A folder of class subfolders of PNG/JPEG files: root/<class_name>/*.png|jpg|jpeg.

Classes are the subfolder names, sorted, so the label of a class does not depend
on the order the file system lists them. If root has `train/` and `test/`
subfolders they are the split (classes taken from train/), otherwise the images
form one pool that load_source splits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from advpipe.config import SourceConfig
from advpipe.datasets.base import Part, RawSource, check_size, source_path
from advpipe.datasets.transforms import resize_pil
from advpipe.errors import DataError, shorten, shown

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg")
#: the most pixels one image may have, checked from its header before it is decoded: a PNG of zeros
#: compresses about 1000:1, so without a bound a 200 KB file decodes to 200 MB (PIL itself only warns
#: below 89 million pixels)
MAX_IMAGE_PIXELS = 8192 * 8192


def read(config: SourceConfig) -> RawSource:
    """Read every image; with source.image_size set they are resized on load, so sizes may mix."""
    root = source_path(config, "dir")
    if (root / "train").is_dir() and (root / "test").is_dir():
        names = class_folders(root / "train")
        train = read_split(root / "train", names, config.image_size)
        test = read_split(root / "test", names, config.image_size)
        return RawSource(names, str(root), train=train, test=test)
    names = class_folders(root)
    return RawSource(names, str(root), pool=read_split(root, names, config.image_size))


def class_folders(folder: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise DataError(f"{folder}: no class folders; expected {folder}/<class_name>/*.png|jpg|jpeg")
    return names


def read_split(folder: Path, class_names: tuple[str, ...], size: int | None) -> Part:
    """All images under `folder`, labelled by the index of their class folder in class_names."""
    files, labels = list_images(folder, class_names)
    arrays, total = [], 0
    for file in files:
        arrays.append(load_image(file, size))
        total += arrays[-1].nbytes
        check_size(total, folder, f"its {len(files)} images ({len(arrays)} read so far)")
    if len({a.shape[-1] for a in arrays}) > 1:
        log.info("%s mixes grayscale and color images; loading all as RGB", folder)
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    check_sizes(arrays, files)
    return Part(np.stack(arrays), np.asarray(labels, dtype=np.int64), str(folder))


def list_images(folder: Path, class_names: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in class_names:
            raise DataError(
                f"{sub}: class folder '{sub.name}' is not among the training classes "
                f"{shown(list(class_names))}; rename or remove it"
            )
        images = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        files += images
        labels += [class_names.index(sub.name)] * len(images)
    if not files:
        raise DataError(f"{folder}: no .png/.jpg/.jpeg images in its class folders; the source is empty")
    return files, labels


def load_image(path: Path, size: int | None) -> np.ndarray:
    """(H, W, 1) for mode L, else (H, W, 3) after converting to RGB; resized if size is set.

    The pixel count is checked from the header (MAX_IMAGE_PIXELS) before anything is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own check, past 89M pixels
            with Image.open(path) as image:
                _check_pixels(path, *image.size)
                image.load()
                image = image if image.mode in ("L", "RGB") else image.convert("RGB")
                if size is not None:
                    image = resize_pil(image, size)
                array = np.asarray(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: refused: {exc}; is this image a decompression bomb?") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({shorten(str(exc))}); replace or remove it") from exc
    return array[..., None] if array.ndim == 2 else array


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: image is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} an image may "
                        "have (a decompression bomb?); shrink it or remove it")


def check_sizes(arrays: list[np.ndarray], files: list[Path]) -> None:
    expected = arrays[0].shape[:2]
    for array, file in zip(arrays, files, strict=True):
        if array.shape[:2] != expected:
            raise DataError(
                f"{file}: image is {array.shape[0]}x{array.shape[1]} (height x width) but "
                f"{files[0]} is {expected[0]}x{expected[1]}; all images must have one size, "
                "or set source.image_size to resize them on load"
            )
