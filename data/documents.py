"""This rank's documents, epoch after epoch, read through a StreamingDataset.

Streaming provides the streams and their mixture (resampling by proportion, reseeded each
epoch), the shuffle (py1e, reseeded each epoch), checksummed download into the local cache and
random access to samples. The partition is ours: StreamingDataset's own iteration pads ranks to
equal sample counts with repeated samples, tracks progress as one global sample count and makes
the ranks of a node start every epoch together (a shared-memory barrier). Packing consumes
documents at a different rate on every rank, so each rank keeps its own position and crosses
epochs on its own; the ranks stay in lockstep in batches, never in documents.

An epoch's global order is split into contiguous node ranges (a node reads its own part of the
shards), strided over the node's ranks, then strided over each rank's logical streams (one per
DataLoader worker): disjoint slices that together cover the epoch exactly. Packing
(data.packing) cuts each logical stream into rows by the documents' lengths, known up front
from the dataset, and reads the documents of its rows in random order.

A logical stream is a `Part`, named by the layout it was made for (rank, world size, ranks per
node, stream of streams), so a job resumed on another number of ranks keeps reading the parts
the saved job read: a rank may serve several, and a part may be split by rows
(`Part.split`), which keeps every row of every epoch served exactly once.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from streaming import StreamingDataset
from streaming.base.shuffle import get_shuffle

from data.distributed import RankInfo
from data.manifest import BUILD_HINT, DatasetError


@dataclass(frozen=True)
class Part:
    """A logical stream: slice `stream` of `streams` of the documents that rank `rank` of a
    `world_size`-rank job (`local_world_size` per node) reads, and of each epoch's rows in
    serving order those at `offset`, `offset + stride`, ... (data.packing)."""

    rank: int
    world_size: int
    local_world_size: int
    stream: int
    streams: int
    offset: int = 0
    stride: int = 1

    @property
    def layout(self) -> RankInfo:
        return RankInfo(self.rank, self.world_size, self.local_world_size)

    def split(self, ways: int) -> list[Part]:
        """`ways` parts that serve this one's rows in turn: together, each row once."""
        return [
            replace(self, offset=self.offset + j * self.stride, stride=self.stride * ways)
            for j in range(ways)
        ]


class RankDocuments:
    """The documents of `rank` in `dataset`, split over `num_streams` logical streams;
    `lengths[sample]` is each sample's token count (EOS included)."""

    def __init__(
        self, dataset: StreamingDataset, rank: RankInfo, num_streams: int, lengths: np.ndarray
    ):
        if len(lengths) != dataset.num_samples:
            raise DatasetError(
                f"the datasets' lengths.npy give {len(lengths)} documents but their shards hold "
                f"{dataset.num_samples}: a dataset is corrupted; rebuild it ({BUILD_HINT})"
            )
        self.dataset = dataset
        self.rank = rank
        self.num_streams = num_streams
        self.lengths = lengths
        self.epoch_order = functools.lru_cache(maxsize=2)(self._epoch_order)
        self._executor: ThreadPoolExecutor | None = None
        self._prepared: dict[int, Future] = {}

    def __getstate__(self) -> dict[str, Any]:  # for spawned DataLoader workers
        state = self.__dict__.copy()
        del state["epoch_order"]
        state.update(_executor=None, _prepared={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.epoch_order = functools.lru_cache(maxsize=2)(self._epoch_order)

    @property
    def parts(self) -> list[Part]:
        """This rank's own logical streams (those of a job that started on this layout)."""
        r = self.rank
        return [
            Part(r.rank, r.world_size, r.local_world_size, s, self.num_streams)
            for s in range(self.num_streams)
        ]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids of the whole epoch in order: streams resampled, then shuffled."""
        ds = self.dataset
        units, sample_of_slot = ds.resample_streams(epoch)
        slots = get_shuffle(
            ds.shuffle_algo, units, 1, ds.shuffle_seed, epoch, ds.shuffle_block_size
        )
        return sample_of_slot[slots]

    def rank_order(self, epoch: int, layout: RankInfo | None = None) -> np.ndarray:
        """The sample ids rank `layout` (default: this one) reads in `epoch`, in order."""
        order, r = self.epoch_order(epoch), layout or self.rank
        n = len(order)
        node = order[r.node * n // r.num_nodes : (r.node + 1) * n // r.num_nodes]
        return node[r.local_rank :: r.local_world_size]

    def part_order(self, epoch: int, part: Part) -> np.ndarray:
        return self.rank_order(epoch, part.layout)[part.stream :: part.streams]

    def stream_order(self, epoch: int, stream: int) -> np.ndarray:
        """The documents of this rank's own logical stream `stream` in `epoch`."""
        return self.part_order(epoch, self.parts[stream])

    def prefetch(self, sample: int) -> None:
        """Start preparing (download, check, decompress) the shard that holds `sample`."""
        shard = int(self.dataset.spanner[sample][0])
        if shard not in self._prepared:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefetch")
            self._prepared[shard] = self._executor.submit(self.dataset.prepare_shard, shard)

    def tokens(self, sample: int) -> np.ndarray:
        """The ids (+ EOS) of one document."""
        shard = int(self.dataset.spanner[sample][0])
        try:
            if shard in self._prepared:
                self._prepared[shard].result()  # re-raises what went wrong in the prefetch
            return self.dataset[sample]["tokens"]
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            reader = self.dataset.shards[shard]
            stream = self.dataset.streams[int(self.dataset.stream_per_shard[shard])]
            name = reader.file_pairs[0][1] or reader.file_pairs[0][0]
            reader.evict()  # a bad copy must not be served again from the cache
            raise DatasetError(
                f"cannot read shard {name.basename} of {stream.remote}/{stream.split}: {e}. The "
                f"cached copy in {stream.local} is evicted. The dataset is corrupted or "
                f"incomplete: rebuild it ({BUILD_HINT}) or copy it again"
            ) from e

    def close(self) -> None:
        """Stop prefetching and drop the dataset (which unregisters its cache directory)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self.epoch_order.cache_clear()
        self.dataset = None
