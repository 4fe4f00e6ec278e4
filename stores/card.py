"""The store card: README.md beside the manifest, for people who find a store by browsing a directory or bucket.

It says what the store holds, each variant with its settings and success rates, where the
store came from, and the three lines of Python that read it. It is rendered from the manifest
alone (no location, no time, no environment), so every copy of a store (local, published,
fetched) carries the same card, and nothing in it can be a credential: the text is also passed
through `advpipe.urls.redact`. The manifest stays the authority; readers never read the card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from advpipe.io import atomic_write_bytes
from advpipe.stores.manifest import Manifest
from advpipe.urls import redact

CARD_NAME = "README.md"


def render_card(manifest: Manifest) -> str:
    """The card's Markdown text, a pure function of the manifest."""
    sections = [_title(manifest), _holds(manifest), _variants(manifest), _provenance(manifest), _reading(manifest)]
    return redact("\n\n".join(sections) + "\n")


def write_card(store_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write README.md into a local store directory (atomically); returns its path."""
    path = Path(store_dir) / CARD_NAME
    atomic_write_bytes(path, render_card(manifest).encode())
    return path


def _title(manifest: Manifest) -> str:
    c, h, w = manifest.image_shape
    variants = len(manifest.variants)
    return (f"# advpipe store: {manifest.source.get('kind', 'images')} {c}x{h}x{w}, {variants} variant"
            f"{'s' if variants != 1 else ''}\n\n"
            "Clean images and precomputed variants of each (adversarial attacks and perturbations) for robust "
            f"training, in {manifest.backend} shards. `manifest.json` beside this card describes every shard "
            "(name, sample range, size, sha256) and is the authority; this card is generated from it by "
            "advpipe and changes only with it.")


def _holds(manifest: Manifest) -> str:
    c, h, w = manifest.image_shape
    rows = ["| split | images | shards | size |", "|---|---:|---:|---:|"]
    for name in _splits(manifest):
        split = manifest.splits[name]
        size = sum(s.bytes for s in split.shards)
        rows.append(f"| {name} | {split.count} | {len(split.shards)} | {_size(size)} |")
    classes = manifest.class_names
    preview = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    return "\n".join([
        "## What it holds", "", *rows, "",
        f"- images: {c} channels, {h}x{w} pixels; variant id 0 is the clean image",
        f"- classes ({len(classes)}): {preview}",
        f"- stored as {manifest.precision}" + (f" with {manifest.compression} compression" if manifest.compression
                                               else "") + f"; format version {manifest.format_version}",
    ])


def _splits(manifest: Manifest) -> list[str]:
    """Split names, train first: the one a reader usually wants."""
    return sorted(manifest.splits, key=lambda name: (name != "train", name))


def _variants(manifest: Manifest) -> str:
    splits = _splits(manifest)
    header = ["variant", "generator", "kind", "stored as", "settings",
              *[f"success ({split})" for split in splits], "failed"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in manifest.variants:
        stats = [manifest.splits[split].stats.get(variant.name) for split in splits]
        success = [_pct(s.success_rate) if s is not None else "-" for s in stats]
        failed = sum(s.failed for s in stats if s is not None)
        settings = _cell(json.dumps(variant.params, sort_keys=True)) if variant.params else "-"
        rows.append(f"| {variant.name} | {variant.generator} | {variant.kind} | {variant.precision} | `{settings}` | "
                    + " | ".join(success) + f" | {failed} |")
    if not manifest.variants:
        rows.append("| (none: clean images only) |" + " |" * (len(header) - 1))
    return "\n".join([
        "## Variants", "", *rows, "",
        "Success: the share of images, among those the source model classifies correctly, that the variant makes "
        "it misclassify, measured on what a reader gets back from this store ('-': not recorded). Failed: images "
        "the generator could not produce (flagged in the shards; the sampler never serves them).",
    ])


def _provenance(manifest: Manifest) -> str:
    model = manifest.model
    model_line = (f"{model.get('arch', '?')}, fingerprint `{str(model.get('fingerprint', '?'))[:16]}`" if model
                  else "none (no attack against a model)")
    versions = ", ".join(f"{name} {version}" for name, version in sorted(manifest.library_versions.items()))
    lines = [
        "## Provenance", "",
        f"- store fingerprint: `{manifest.fingerprint}`",
        f"- made by: {manifest.created_by or 'advpipe'}; seed {manifest.seed}",
        f"- source: `{_cell(json.dumps(manifest.source, sort_keys=True))}`",
        f"- source model: {model_line}",
        f"- libraries: {versions or '-'}",
    ]
    if manifest.generation:
        lines.append(f"- generation: `{_cell(json.dumps(manifest.generation, sort_keys=True))}`")
    return "\n".join(lines)


def _reading(manifest: Manifest) -> str:
    split = next(iter(_splits(manifest)), "train")
    variant = manifest.variant_names[0] if manifest.variants else "clean"
    c, h, w = manifest.image_shape
    return "\n".join([
        "## Reading it", "",
        "```python",
        "from advpipe.stores import open_store",
        'store = open_store("s3://BUCKET/PATH/TO/THIS/STORE")  # this directory: its URL, or a local path',
        f'x = store.split("{split}").read([0, 1, 2], store.variant_id("{variant}"))  '
        f"# float32 (3, {c}, {h}, {w}) in [0, 1]",
        "```", "",
        "`advpipe verify URL` checks every shard against the manifest; `advpipe fetch URL DIR` makes a verified "
        "local copy; training reads the store through `advpipe.sampler.open_loader(URL, ...)`. Credentials come "
        "from the storage provider's usual environment variables, config files or profiles.",
    ])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
