"""Held-out windows for the extrapolation evaluations: contiguous runs of the val split.

The val split's documents (ids + EOS each) in stored order form one token stream. It is cut into
non-overlapping slots of `length + 1` tokens and `count` slots are drawn without replacement
with `seed`, so the windows are the same on every call and every machine. Only the shards the
windows touch are read (the manifest records each shard's token count).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.manifest import DatasetError, read_manifest
from data.shards import read_shard, split_shards


def validation_windows(path: str, length: int, count: int, seed: int) -> torch.Tensor:
    """LongTensor [count, length + 1] of the val split of dataset `path`: inputs w[:, :-1],
    targets w[:, 1:]. Deterministic in (path, length, count, seed)."""
    if length < 1 or count < 1:
        raise ValueError(f"length {length} and count {count} must be >= 1")
    val = read_manifest(path)["val"]
    slots = val["tokens"] // (length + 1)
    if count > slots:
        raise DatasetError(
            f"the val split of {path} holds {val['tokens']:,} tokens, room for {slots} windows "
            f"of {length} + 1 tokens, not {count}; ask for fewer or shorter windows, or prepare "
            f"the dataset with a larger --val-fraction"
        )
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(slots, size=count, replace=False)) * (length + 1)

    split_dir = Path(path) / "val"
    shards = split_shards(split_dir)
    if len(shards) != len(val["shard_tokens"]):
        raise DatasetError(f"{split_dir}/index.json does not match {path}/dataset.json; rebuild it")
    bounds = np.concatenate([[0], np.cumsum(val["shard_tokens"])])
    cache: dict[int, np.ndarray] = {}
    windows = np.empty((count, length + 1), np.int64)
    for row, start in enumerate(starts.tolist()):
        end = start + length + 1
        first, last = np.searchsorted(bounds, [start, end - 1], side="right") - 1
        for s in range(int(first), int(last) + 1):
            if s not in cache:
                cache = {s: np.concatenate(read_shard(split_dir, shards[s]))}  # one shard at a time
                if len(cache[s]) != bounds[s + 1] - bounds[s]:
                    raise DatasetError(
                        f"shard {s} of {split_dir} holds {len(cache[s])} tokens, not the "
                        f"{bounds[s + 1] - bounds[s]} of {path}/dataset.json; rebuild the dataset"
                    )
            lo, hi = max(start, bounds[s]), min(end, bounds[s + 1])
            windows[row, lo - start : hi - start] = cache[s][lo - bounds[s] : hi - bounds[s]]
    return torch.from_numpy(windows)
