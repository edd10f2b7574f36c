"""data.validation: held-out windows are contiguous, slot-aligned runs of the val token stream,
deterministic, of any length the val split has room for."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from data_helpers import build_dataset, read_split

from data.manifest import DatasetError, read_manifest
from data.validation import validation_windows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory, "val_heavy", val_fraction=0.6, shard_size="4kb")[0]


@pytest.mark.parametrize(("length", "count"), [(16, 12), (128, 8), (1024, 8)])
def test_windows_are_slot_aligned_runs_of_the_val_stream(dataset, length, count):
    stream = np.concatenate(read_split(dataset, "val")).astype(np.int64)
    assert len(read_manifest(dataset)["val"]["shard_tokens"]) > 3
    windows = validation_windows(str(dataset), length, count, seed=0)
    assert windows.shape == (count, length + 1) and windows.dtype == torch.int64
    slots = stream[: len(stream) // (length + 1) * (length + 1)].reshape(-1, length + 1)
    found = [int(np.flatnonzero((slots == w.numpy()).all(axis=1))[0]) for w in windows]
    assert len(set(found)) == count  # distinct, non-overlapping
    assert torch.equal(windows, validation_windows(str(dataset), length, count, seed=0))
    assert not torch.equal(windows, validation_windows(str(dataset), length, count, seed=1))


def test_windows_cross_shard_boundaries(dataset):
    bounds = np.cumsum(read_manifest(dataset)["val"]["shard_tokens"])
    stream = np.concatenate(read_split(dataset, "val")).astype(np.int64)
    length = 1024
    slots = len(stream) // (length + 1)
    windows = validation_windows(str(dataset), length, slots, seed=0)  # every slot
    starts = np.arange(slots) * (length + 1)
    assert any(((starts < b) & (b < starts + length + 1)).any() for b in bounds[:-1])
    np.testing.assert_array_equal(
        windows.numpy(), stream[: slots * (length + 1)].reshape(slots, -1)
    )


def test_bad_requests_and_corruption_are_clear_errors(dataset, tmp_path):
    tokens = read_manifest(dataset)["val"]["tokens"]
    with pytest.raises(DatasetError, match=r"room for .* windows .*--val-fraction"):
        validation_windows(str(dataset), tokens, 2, seed=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        validation_windows(str(dataset), 0, 2, seed=0)
    with pytest.raises(DatasetError, match=r"does not exist.*make data"):
        validation_windows(str(tmp_path / "missing"), 16, 2, seed=0)
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    for shard in (copy / "val").glob("*.zstd"):
        shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    with pytest.raises(DatasetError, match=r"shard .*val/shard\.\d+\.mds\.zstd is corrupted"):
        validation_windows(str(copy), 16, 2, seed=0)
