"""The training loader: packed batches for this rank, forever, exactly resumable.

    loader = build_train_loader(cfg.data, seq_len=128, batch_size=16, seed=0)
    batch = next(iter(loader))  # tokens, targets [B, T]; doc_ids [B, T] or None; documents
    state = loader.state_dict()  # JSON; after a restart: fresh_loader.load_state_dict(state)

Documents come from one or more streams (prepared datasets, local or remote) through a
StreamingDataset (data.documents), are packed into rows of any length chosen here and served
in a shuffled order of the epoch's rows (data.packing), and batched. Each rank has one logical
stream per DataLoader worker (one when num_workers = 0), served in turn; the state is every
logical stream's position (epoch, next row, the epoch's first token) and which one serves
next, so resuming is exact with or without workers. StreamingDataLoader is not used: its state
is one global sample count, which packing breaks.

A job resumed on another number of ranks takes its states from `reshard`: the saved job's
logical streams, in the order it served them, dealt to the new ranks (several to a rank, or
each split by rows over several ranks), so the rest of every epoch is read exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from streaming import Stream, StreamingDataset
from streaming.base.storage import CloudDownloader
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.cache import (
    INDEX,
    CacheSlot,
    cache_root,
    claim_slot,
    streaming_setup_lock,
    verify_cached_split,
)
from data.config import DataConfig
from data.distributed import RankInfo, data_layout, gather, init_process_group, rank_info
from data.documents import Part, RankDocuments
from data.manifest import LENGTHS, MANIFEST, DatasetError, parse_manifest, read_manifest
from data.packing import Position, ShuffledRows, make_batch

log = logging.getLogger(__name__)

SPLIT = "train"
STATE_VERSION = 3  # 2: rows in shuffled order (data.packing); 3: logical streams named (Part)
SHUFFLE_BLOCK = 1 << 18  # py1e shuffle window, in documents
DOWNLOAD_TIMEOUT_S = 300


@dataclass(frozen=True)
class StreamSource:
    """One training stream: where its dataset lives, its share, its manifest."""

    location: str  # absolute local path or remote URL of a dataset directory
    proportion: float | None
    manifest: dict[str, Any]


def _is_remote(path: str) -> bool:
    return "://" in path


def _fetch(location: str, name: str) -> bytes:
    """The bytes of file `name` of the dataset at `location` (a local path or a remote URL)."""
    if not _is_remote(location):
        try:
            return (Path(location) / name).read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read {location}/{name}: {e.strerror or e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "download")
        try:
            CloudDownloader.direct_download(f"{location}/{name}", local, DOWNLOAD_TIMEOUT_S)
            return Path(local).read_bytes()
        except Exception as e:  # each remote client raises its own errors
            raise DatasetError(f"cannot fetch {location}/{name}: {e}") from e


def _stream_manifest(location: str) -> dict[str, Any]:
    if not _is_remote(location):
        return read_manifest(location)
    return parse_manifest(_fetch(location, MANIFEST), f"{location}/{MANIFEST}")


def _document_lengths(sources: list[StreamSource]) -> np.ndarray:
    """Every training sample's token count, in streaming's sample order (stream by stream)."""
    lengths = []
    for source in sources:
        name = f"{SPLIT}/{LENGTHS}"
        try:
            found = np.load(io.BytesIO(_fetch(source.location, name)), allow_pickle=False)
        except ValueError as e:
            raise DatasetError(f"{source.location}/{name} is not a lengths array: {e}") from None
        expected = source.manifest[SPLIT]["documents"]
        if found.shape != (expected,) or found.dtype.kind not in "iu":
            raise DatasetError(
                f"{source.location}/{name} holds {found.dtype} {found.shape}, not the lengths of "
                f"its {expected} documents; rebuild the dataset"
            )
        lengths.append(found.astype(np.int64))
    return np.concatenate(lengths)


def _verify_cache(sources: list[StreamSource], directory: Path) -> None:
    """Evict from the cache slot `directory` whatever its streams' sources do not vouch for."""
    for i, source in enumerate(sources):
        local = directory / f"stream-{i}" / SPLIT
        evicted = verify_cached_split(local, _fetch(source.location, f"{SPLIT}/{INDEX}"))
        if evicted:
            log.warning(
                "evicted from the cache %s what %s does not hold: %s",
                local,
                source.location,
                ", ".join(evicted),
            )


def resolve_streams(cfg: DataConfig) -> tuple[dict[str, Any], list[StreamSource]]:
    """The manifest of data.path and the training streams, checked against it."""
    main = read_manifest(cfg.path)
    if not cfg.streams:
        return main, [StreamSource(os.path.abspath(cfg.path), None, main)]
    given = [s.proportion is not None for s in cfg.streams]
    if any(given) and not all(given):
        raise DatasetError("data.streams: give every stream a proportion, or none of them")
    sources = []
    for i, stream in enumerate(cfg.streams):
        if not stream.path:
            raise DatasetError(f"data.streams[{i}].path is empty; give a dataset directory or URL")
        if stream.proportion is not None and stream.proportion <= 0:
            raise DatasetError(
                f"data.streams[{i}].proportion is {stream.proportion}; it must be > 0"
            )
        location = stream.path.rstrip("/")
        location = location if _is_remote(location) else os.path.abspath(location)
        manifest = _stream_manifest(location)
        if manifest["tokenizer_sha256"] != main["tokenizer_sha256"]:
            raise DatasetError(
                f"data.streams[{i}] ({stream.path}) was tokenized with another tokenizer than "
                f"data.path ({cfg.path}); prepare it with --tokenizer {cfg.path}/tokenizer.json"
            )
        if manifest["eos_id"] != main["eos_id"]:
            raise DatasetError(
                f"data.streams[{i}] ({stream.path}) ends documents with token {manifest['eos_id']}"
                f" and data.path ({cfg.path}) with {main['eos_id']}; prepare it again without "
                "--eos-token, or with data.path's"
            )
        sources.append(StreamSource(location, stream.proportion, manifest))
    return main, sources


def documents_per_epoch(sources: list[StreamSource]) -> list[int] | None:
    """How many documents each stream gives an epoch so that its share of the epoch's tokens is
    its proportion (normalised) and the epoch holds as many tokens as all the streams together;
    None without proportions (every document once). A stream of short documents is drawn more
    often: proportions are shares of training tokens, not of documents."""
    if sources[0].proportion is None:
        return None
    shares = np.array([s.proportion for s in sources], np.float64)
    shares /= shares.sum()
    tokens = np.array([s.manifest[SPLIT]["tokens"] for s in sources], np.float64)
    documents = np.array([s.manifest[SPLIT]["documents"] for s in sources], np.float64)
    return [max(1, round(n)) for n in shares * tokens.sum() / (tokens / documents)]


def _streaming_dataset(
    sources: list[StreamSource], choose: list[int] | None, directory: Path, seed: int
) -> StreamingDataset:
    """The StreamingDataset of the streams, cached under `directory`: it supplies each epoch's
    documents of every stream (`choose`, from `documents_per_epoch`, drawn anew each epoch; None:
    all of them) in a shuffled global order, checksums and reading; not its iteration."""
    choose = choose or [None] * len(sources)
    return StreamingDataset(
        streams=[
            Stream(remote=s.location, local=str(directory / f"stream-{i}"), choose=n)
            for i, (s, n) in enumerate(zip(sources, choose, strict=True))
        ],
        split=SPLIT,
        download_timeout=DOWNLOAD_TIMEOUT_S,
        validate_hash="xxh64",
        shuffle=True,
        shuffle_algo="py1e",
        shuffle_seed=seed,
        shuffle_block_size=SHUFFLE_BLOCK,
        num_canonical_nodes=1,  # one global order; the node split is data.documents'
        batch_size=1,  # partitioning unit: documents (rows are packed later)
    )


def build_train_loader(
    data_cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, sequence_parallel: int = 1
) -> TrainLoader:
    """This rank's training loader (rank, world size from the torch.distributed environment);
    each `sequence_parallel` consecutive ranks read the same batches (`data_layout`).

    Collective: every rank of the job calls it at the same time."""
    if seq_len < 1 or batch_size < 1:
        raise DatasetError(f"seq_len {seq_len} and batch_size {batch_size} must be >= 1")
    if seed < 0:
        raise DatasetError(f"seed {seed} must be >= 0 (streaming's shuffle seed)")
    info = rank_info()
    main, sources = resolve_streams(data_cfg)
    mixture = documents_per_epoch(sources)
    key = hashlib.sha256(
        json.dumps([(s.location, s.manifest["fingerprint"]) for s in sources]).encode()
    ).hexdigest()[:16]
    initialised = init_process_group(info)
    slot = None
    try:
        if info.local_rank == 0:
            slot = claim_slot(cache_root(data_cfg.cache_dir) / key)
            _verify_cache(sources, slot.directory)
        # Every rank uses its node leader's slot, claimed (and cleaned) before anyone reads it.
        slots = gather(slot and str(slot.directory), info)
        directory = Path(slots[info.node * info.local_world_size])
        with streaming_setup_lock() if info.local_rank == 0 else nullcontext():
            dataset = _streaming_dataset(sources, mixture, directory, seed)
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    finally:
        if initialised:
            dist.destroy_process_group()
    streams_per_rank = max(data_cfg.num_workers, 1)
    layout = data_layout(info, sequence_parallel)
    if dataset.epoch_size < layout.world_size * streams_per_rank:
        if slot is not None:
            slot.release()
        raise DatasetError(
            f"an epoch has {dataset.epoch_size} documents, fewer than ranks x workers = "
            f"{layout.world_size} x {streams_per_rank}; use a bigger dataset or fewer workers"
        )
    return TrainLoader(
        RankDocuments(dataset, layout, streams_per_rank, _document_lengths(sources)),
        seq_len=seq_len,
        batch_size=batch_size,
        boundaries=data_cfg.packing == "boundaries",
        num_workers=data_cfg.num_workers,
        eos_id=main["eos_id"],
        tokenizer_sha256=main["tokenizer_sha256"],
        identity={
            "streams": key,
            "seed": seed,
            "seq_len": seq_len,
            "documents_per_epoch": mixture,
        },
        slot=slot,
    )


def _batches(
    documents: RankDocuments,
    streams: list[int],
    parts: list[Part],
    positions: list[Position],
    rows: int,
    length: int,
    eos_id: int,
    boundaries: bool,
) -> Iterator[tuple[int, dict, Position]]:
    """(stream, batch, stream's position after it) for `streams` (indices into `parts`) in
    turn, forever."""
    seed = documents.dataset.shuffle_seed
    packed = {s: ShuffledRows(documents, parts[s], length, seed, positions[s]) for s in streams}
    while True:
        for s in streams:
            batch = make_batch(*packed[s].next_rows(rows), eos_id=eos_id, boundaries=boundaries)
            yield s, batch, packed[s].position


def _turns(first: int, count: int, every: int = 1) -> list[int]:
    """Every `every`-th of `count` logical streams served in turn from `first`."""
    return [(first + i) % count for i in range(0, count, every)]


class _WorkerBatches(IterableDataset):
    """DataLoader worker w serves logical streams first + w, first + w + workers, ... (mod
    their count) in turn; the DataLoader takes the workers' batches in turn, so the batches
    come in the streams' order."""

    def __init__(self, first: int, **kwargs: Any):
        self.first, self.kwargs = first, kwargs

    def __iter__(self):
        worker = get_worker_info()
        count = len(self.kwargs["parts"])
        return _batches(
            streams=_turns(self.first + worker.id, count, worker.num_workers), **self.kwargs
        )


def _as_is(item: Any) -> Any:
    return item


class TrainLoader:
    """Endless packed batches for this rank; `state_dict()` / `load_state_dict()` resume exactly."""

    def __init__(
        self,
        documents: RankDocuments,
        *,
        seq_len: int,
        batch_size: int,
        boundaries: bool,
        num_workers: int,
        eos_id: int,
        tokenizer_sha256: str,
        identity: dict[str, Any],
        slot: CacheSlot | None,
    ):
        self.documents = documents
        self.seq_len, self.batch_size, self.boundaries = seq_len, batch_size, boundaries
        self.num_workers, self.eos_id = num_workers, eos_id
        self.tokenizer_sha256 = tokenizer_sha256  # of the dataset's tokenizer.json
        self._identity = {
            "rank": documents.rank.rank,
            "world_size": documents.rank.world_size,
            "num_workers": num_workers,
            **identity,
        }
        self._slot = slot
        self._parts = documents.parts
        self._positions = [Position()] * len(self._parts)
        self._next_stream = 0
        self._pipeline: Iterator | None = None

    @property
    def rank(self) -> RankInfo:
        return self.documents.rank

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        if self._pipeline is None:
            self._pipeline = self._start()
        stream, batch, position = next(self._pipeline)
        self._positions[stream] = position
        self._next_stream = (stream + 1) % len(self._positions)
        return batch

    def _start(self) -> Iterator:
        kwargs = dict(
            documents=self.documents,
            parts=list(self._parts),
            positions=list(self._positions),
            rows=self.batch_size,
            length=self.seq_len,
            eos_id=self.eos_id,
            boundaries=self.boundaries,
        )
        if self.num_workers == 0:
            return _batches(streams=_turns(self._next_stream, len(self._parts)), **kwargs)
        workers = _WorkerBatches(self._next_stream, **kwargs)
        return iter(
            DataLoader(workers, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is)
        )

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded (JSON-serialisable; one per rank)."""
        return {
            "version": STATE_VERSION,
            **self._identity,
            "next_stream": self._next_stream,
            "parts": [asdict(p) for p in self._parts],
            "positions": [list(astuple(p)) for p in self._positions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from this rank's `state_dict()`): the next batch is the one
        the saving loader would have yielded next. batch_size and packing may differ (rows are
        served one by one), seq_len may not (it lays out the rows). A state of the previous
        version (2) is read as this rank's own logical streams."""
        if state.get("version") == 2:
            state = {**state, "version": STATE_VERSION, "parts": [asdict(p) for p in self._parts]}
        expected = {"version": STATE_VERSION, **self._identity}
        differ = [
            f"{k}: saved {state.get(k)!r}, now {v!r}"
            for k, v in expected.items()
            if state.get(k) != v
        ]
        if differ:
            raise DatasetError(
                "the loader state does not belong to this loader (" + "; ".join(differ) + "); "
                "resume with the same ranks, data.num_workers, data.seq_len, datasets, mixture "
                "proportions and run.seed"
            )
        parts = [Part(**p) for p in state["parts"]]
        if len(parts) % max(self.num_workers, 1):
            raise DatasetError(
                f"this rank serves {len(parts)} logical streams, which data.num_workers="
                f"{self.num_workers} workers cannot share evenly; set data.num_workers to a "
                f"divisor of {len(parts)}"
            )
        self._close_pipeline()
        self._parts = parts
        self._positions = [Position(*p) for p in state["positions"]]
        self._next_stream = state["next_stream"]

    def epoch_documents(self, epoch: int) -> list[int]:
        """The sample ids this rank's own layout reads in `epoch`, in order."""
        return self.documents.rank_order(epoch).tolist()

    def _close_pipeline(self) -> None:
        self._pipeline = None  # a DataLoader iterator shuts its workers down when dropped

    def close(self) -> None:
        """Stop workers and prefetching, and free the cache slot."""
        self._close_pipeline()
        self.documents.close()
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reshard(
    states: list[dict[str, Any]], rank: int, world_size: int, num_workers: int
) -> dict[str, Any]:
    """The loader state of `rank` of `world_size` ranks (`num_workers` DataLoader workers
    each) that resume a job whose ranks saved
    `states` (in rank order). The saved logical streams, in the order the job served them (rank
    by rank, each from its next), are split by rows into the fewest equal ways k that give
    every worker of every rank as many (n k divisible by world_size x workers) and dealt out
    in order, an equal run to each rank: every row the saved job had not served is served
    once. With as many micro-batches per step as before (data.batch_size x
    train.grad_accum x ranks unchanged), a step's rows are the ones the saved job would have
    used, when the saved ranks' streams are merged (fewer ranks)."""
    if any(state.get("version") != STATE_VERSION for state in states):
        raise DatasetError(
            "the checkpoint's loader states predate resuming on another number of ranks "
            f"(version {states[0].get('version')}); resume it on {len(states)} ranks"
        )
    served: list[tuple[Part, Position]] = []
    for state in states:
        pairs = [
            (Part(**part), Position(*position))
            for part, position in zip(state["parts"], state["positions"], strict=True)
        ]
        served += [pairs[i] for i in _turns(state["next_stream"], len(pairs))]
    slots = world_size * max(num_workers, 1)
    ways = slots // math.gcd(len(served), slots)
    split = [
        (sub, Position(position.epoch, position.index + j * part.stride, position.start))
        for part, position in served
        for j, sub in enumerate(part.split(ways))
    ]
    share = len(split) // world_size
    mine = split[rank * share : (rank + 1) * share]
    return {
        **states[0],
        "rank": rank,
        "world_size": world_size,
        "num_workers": num_workers,
        "next_stream": 0,
        "parts": [asdict(part) for part, _ in mine],
        "positions": [list(astuple(position)) for _, position in mine],
    }
