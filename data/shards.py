"""Direct reading of a local split's MDS shards (no StreamingDataset, no shared memory).

For readers outside the training loop (validation windows, tests): a shard is read whole,
its xxh64 checksum checked, decompressed and decoded with streaming's MDS sample decoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from streaming.base.compression import decompress
from streaming.base.format.mds import MDSReader
from streaming.base.hashing import get_hash

from data.manifest import BUILD_HINT, DatasetError


def split_shards(split_dir: str | Path) -> list[dict[str, Any]]:
    """The shard entries of a split's index.json."""
    file = Path(split_dir) / "index.json"
    try:
        return json.loads(file.read_text())["shards"]
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"cannot read {file} ({e}); rebuild the dataset: {BUILD_HINT}") from None


def read_shard(split_dir: str | Path, shard: dict[str, Any]) -> list[np.ndarray]:
    """The `tokens` of every sample of one shard (an entry of split_shards), in order."""
    stored = shard["zip_data"] or shard["raw_data"]
    file = Path(split_dir) / stored["basename"]
    try:
        data = file.read_bytes()
        for algo, expected in stored["hashes"].items():
            if get_hash(algo, data) != expected:
                raise ValueError(f"{algo} checksum mismatch")
        if shard["zip_data"]:
            data = decompress(shard["compression"], data)
        reader = MDSReader.from_json(str(split_dir), None, shard)
        count = int(np.frombuffer(data, np.uint32, 1)[0])
        offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
        return [
            reader.decode_sample(data[begin:end])["tokens"]
            for begin, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
        ]
    except Exception as e:  # zstd, numpy and MDS decoding raise assorted errors on bad bytes
        raise DatasetError(
            f"shard {file} is corrupted or unreadable ({e}); rebuild the dataset: {BUILD_HINT}"
        ) from e
