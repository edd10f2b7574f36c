"""A prepared dataset's manifest, DIR/dataset.json, and the error every data problem raises.

A dataset directory from `python -m data.prepare` holds tokenizer.json, train/ and val/ (MDS
shards, one document per sample, and `lengths.npy`: every sample's token count, in sample order)
and dataset.json, written last: a directory without it is not a dataset. The manifest records
the vocabulary, the EOS id, what the dataset was built from (a fingerprint of the inputs and
options) and the token count of every shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "dataset.json"
FORMAT = "rotalibi-dataset/2"  # /2: lengths.npy in each split
LENGTHS = "lengths.npy"
SPLITS = ("train", "val")
BUILD_HINT = (
    "build it with `make data` (the default corpus) or `python -m data.prepare --input ...`"
)


class DatasetError(ValueError):
    """A data problem (missing or corrupted dataset, bad input), stated with its fix."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the dataset directory `path`; DatasetError if it is not a dataset."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        what = "does not exist" if not path.exists() else f"has no {MANIFEST}"
        raise DatasetError(f"dataset {path} {what}; {BUILD_HINT}")
    return parse_manifest(file.read_bytes(), str(file))


def parse_manifest(raw: bytes, origin: str) -> dict[str, Any]:
    """Decode and check manifest bytes read from `origin` (a path or URL, for messages)."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(
            f"{origin} is corrupted ({e}); rebuild the dataset: {BUILD_HINT}"
        ) from None
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found != FORMAT:
        raise DatasetError(
            f"{origin} is not a {FORMAT} manifest (found {found!r}); rebuild the dataset: "
            f"{BUILD_HINT}"
        )
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
