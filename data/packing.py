"""Packing: every logical stream's documents, epoch after epoch, cut into training rows that are
served in a shuffled order.

A logical stream's documents (each its ids + EOS), epoch after epoch, make one endless token
sequence. Row k is its tokens [k L, k L + L]: L + 1 tokens, consecutive rows sharing one (the
last target of a row is the first input of the next), so every token is a target exactly once.
A row belongs to the epoch its first token lies in, and each epoch's rows are served in a
seeded order (Megatron's sample index: the rows' start positions, permuted per epoch) that is
stratified by document: the n rows of a document take n evenly spaced places of the epoch, at
a random phase and in random order. So a batch takes its rows from all over the epoch, not from
one or two documents, and a long document is spread over the whole epoch instead of filling
the batches that follow (a plain random permutation would still serve the few longest files of
a corpus in most batches, and in consecutive ones). Finding a row's tokens needs each
document's length, which the dataset stores (`<split>/lengths.npy`, data.prepare).

The state is the position in that order, (epoch, index of the next row, the epoch's first
token in the endless sequence): resuming from it serves the same rows in the same order. A
logical stream split by rows (data.documents.Part) serves every `stride`-th row of each
epoch's order, from its `offset`.

With `boundaries` packing every EOS starts a new document: it plays the beginning-of-document
role for the text after it (the model learns to predict a document's first token from EOS
alone) while the token before it, still in the old document, learns to predict the end. No
target is masked. `doc_ids` numbers the documents of each row from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from data.documents import Part
from data.manifest import BUILD_HINT, DatasetError

PREFETCH_ROWS = 64  # prepare (download, check, decompress) the shards of rows this far ahead


class StreamDocuments(Protocol):
    """What packing reads: one logical stream's documents, by epoch."""

    lengths: np.ndarray  # tokens (EOS included) of every sample id

    def part_order(self, epoch: int, part: Part) -> np.ndarray: ...  # its sample ids, in order

    def tokens(self, sample: int) -> np.ndarray: ...

    def prefetch(self, sample: int) -> None: ...


@dataclass(frozen=True)
class Position:
    """The next row is the `index`-th of `epoch`'s permutation (none left when past its end);
    `start` is the epoch's first token in the stream's endless token sequence."""

    epoch: int = 0
    index: int = 0
    start: int = 0


class _Epoch:
    """One epoch of a logical stream: its documents and where each begins."""

    def __init__(self, order: np.ndarray, lengths: np.ndarray, start: int):
        self.order, self.start = order, start
        self.bounds = np.concatenate([[0], np.cumsum(lengths[order], dtype=np.int64)])

    @property
    def end(self) -> int:
        return self.start + int(self.bounds[-1])


class ShuffledRows:
    """Rows of `length + 1` tokens of logical stream `part`, each epoch's in the permutation
    drawn from `seed` and the part's rank and stream, starting at `position`."""

    def __init__(
        self,
        documents: StreamDocuments,
        part: Part,
        length: int,
        seed: int,
        position: Position,
    ):
        self.documents, self.part, self.length, self.seed = documents, part, length, seed
        self._epochs = {position.epoch: self._new_epoch(position.epoch, position.start)}
        self._epoch, self._index = position.epoch, position.index
        self._rows = self._permutation(position.epoch)

    @property
    def position(self) -> Position:
        return Position(self._epoch, self._index, self._epochs[self._epoch].start)

    def _new_epoch(self, epoch: int, start: int) -> _Epoch:
        order = self.documents.part_order(epoch, self.part)
        return _Epoch(order, self.documents.lengths, start)

    def _get_epoch(self, epoch: int) -> _Epoch:
        """An epoch at or after the current one (each starts where the one before ends)."""
        if epoch not in self._epochs:
            self._epochs[epoch] = self._new_epoch(epoch, self._get_epoch(epoch - 1).end)
        return self._epochs[epoch]

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's rows (those whose first token is in it), in serving order: each
        document's rows spread evenly over the epoch, in random order and phase."""
        here = self._get_epoch(epoch)
        first, end = -(-here.start // self.length), -(-here.end // self.length)
        rows = np.arange(first, end)
        # The document (index in the epoch) of each row's first token, and its rows' count.
        doc = np.searchsorted(here.bounds, rows * self.length - here.start, side="right") - 1
        counts = np.bincount(doc, minlength=len(here.order))
        rng = np.random.default_rng([self.seed, self.part.rank, self.part.stream, epoch])
        grouped = np.lexsort((rng.random(len(rows)), doc))  # by document, randomly within
        slot = np.empty(len(rows), np.int64)  # a row's place among its document's rows
        slot[grouped] = np.arange(len(rows)) - (np.cumsum(counts) - counts)[doc[grouped]]
        phase = rng.random(len(here.order))
        return rows[np.argsort((slot + phase[doc]) / counts[doc], kind="stable")]

    def _advance_epoch(self) -> None:
        self._epoch, self._index = self._epoch + 1, self.part.offset
        self._rows = self._permutation(self._epoch)
        self._epochs = {e: v for e, v in self._epochs.items() if e >= self._epoch}

    def next_rows(self, rows: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The next rows: their tokens, int64 [rows, length + 1], their numbers (row k starts at
        token k * length of the stream), and how many distinct documents they hold."""
        out = np.empty((rows, self.length + 1), np.int64)
        numbers = np.empty(rows, np.int64)
        documents: set[tuple[int, int]] = set()
        for r in range(rows):
            while self._index >= len(self._rows):
                self._advance_epoch()
            ahead = self._index + PREFETCH_ROWS
            if ahead < len(self._rows):
                self._prefetch(int(self._rows[ahead]))
            numbers[r] = self._rows[self._index]
            self._read(int(numbers[r]), out[r], documents)
            self._index += self.part.stride
        return out, numbers, len(documents)

    def _locate(self, token: int) -> tuple[int, int]:
        """(epoch, document index in it) holding token `token` of the current epoch onwards."""
        epoch = self._epoch
        while self._get_epoch(epoch).end <= token:
            epoch += 1
        here = self._get_epoch(epoch)
        return epoch, int(np.searchsorted(here.bounds, token - here.start, side="right")) - 1

    def _prefetch(self, row: int) -> None:
        epoch, doc = self._locate(row * self.length)
        self.documents.prefetch(int(self._get_epoch(epoch).order[doc]))

    def _read(self, row: int, out: np.ndarray, documents: set[tuple[int, int]]) -> None:
        """Row `row`'s tokens into `out`; the (epoch, document index) pairs it touches into
        `documents`."""
        token = row * self.length
        epoch, doc = self._locate(token)
        filled = 0
        while filled < len(out):
            here = self._get_epoch(epoch)
            if doc == len(here.order):
                epoch, doc = epoch + 1, 0
                continue
            ids = self.documents.tokens(int(here.order[doc]))
            if len(ids) != here.bounds[doc + 1] - here.bounds[doc]:
                raise DatasetError(
                    f"sample {int(here.order[doc])} has {len(ids)} tokens but lengths.npy says "
                    f"{here.bounds[doc + 1] - here.bounds[doc]}: the dataset is corrupted; "
                    f"rebuild it ({BUILD_HINT})"
                )
            offset = token + filled - here.start - int(here.bounds[doc])
            take = min(len(ids) - offset, len(out) - filled)
            out[filled : filled + take] = ids[offset : offset + take]
            documents.add((epoch, doc))
            filled += take
            doc += 1


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """Document number of each token of rows [B, T]: 0 at the row start, +1 at every EOS."""
    return (tokens == eos_id).long().cumsum(dim=1)


def make_batch(
    rows: np.ndarray, numbers: np.ndarray, documents: int, *, eos_id: int, boundaries: bool
) -> dict[str, Tensor | int | None]:
    """The training batch of rows [B, T + 1]: tokens, next-token targets, doc_ids, the rows'
    numbers in their logical stream, and the number of distinct documents they come from."""
    rows = torch.from_numpy(rows)
    tokens, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    doc_ids = document_ids(tokens, eos_id) if boundaries else None
    return {
        "tokens": tokens,
        "targets": targets,
        "doc_ids": doc_ids,
        "rows": torch.from_numpy(numbers),
        "documents": documents,
    }
