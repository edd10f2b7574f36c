"""Packing: an endless stream of documents cut into training rows of any length.

Documents (each its ids + EOS) are concatenated in order and cut into rows of `length + 1`
tokens; consecutive rows share one token (the last target of a row is the first input of the
next), so every token is a target exactly once. The position of the next row's first token,
(epoch, document index, offset), is the whole state: resuming from it continues the
concatenation exactly, whatever the leftover of a long document.

With `boundaries` packing every EOS starts a new document: it plays the beginning-of-document
role for the text after it (the model learns to predict a document's first token from EOS
alone) while the token before it, still in the old document, learns to predict the end. No
target is masked. `doc_ids` numbers the documents of each row from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# documents(epoch, index) -> (epoch, index, ids) for that document and every one after it.
Documents = Callable[[int, int], Iterator[tuple[int, int, np.ndarray]]]


@dataclass(frozen=True)
class Position:
    """The next row starts at token `offset` of document `doc` of `epoch`'s order."""

    epoch: int = 0
    doc: int = 0
    offset: int = 0


class PackedStream:
    """Rows of `length + 1` tokens cut from `documents`, starting at `position`."""

    def __init__(self, documents: Documents, position: Position):
        self._documents = documents(position.epoch, position.doc)
        self._epoch, self._doc, self._ids = next(self._documents)
        self._offset = position.offset

    @property
    def position(self) -> Position:
        return Position(self._epoch, self._doc, self._offset)

    def next_rows(self, rows: int, length: int) -> np.ndarray:
        """The next rows, int64 [rows, length + 1], each beginning with the last token before it."""
        need = rows * length + 1
        out = np.empty(need, np.int64)
        filled = 0
        while True:
            take = min(len(self._ids) - self._offset, need - filled)
            out[filled : filled + take] = self._ids[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if filled == need:
                break
            self._epoch, self._doc, self._ids = next(self._documents)
            self._offset = 0
        self._offset -= 1  # the last token (>= 1 taken from this document) starts the next rows
        return np.lib.stride_tricks.as_strided(
            out, shape=(rows, length + 1), strides=(length * out.itemsize, out.itemsize)
        ).copy()


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """Document number of each token of rows [B, T]: 0 at the row start, +1 at every EOS."""
    return (tokens == eos_id).long().cumsum(dim=1)


def make_batch(rows: np.ndarray, eos_id: int, boundaries: bool) -> dict[str, Tensor | None]:
    """The training batch of rows [B, T + 1]: tokens, next-token targets, doc_ids."""
    rows = torch.from_numpy(rows)
    tokens, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    doc_ids = document_ids(tokens, eos_id) if boundaries else None
    return {"tokens": tokens, "targets": targets, "doc_ids": doc_ids}
