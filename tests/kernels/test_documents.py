"""Document bounds (`kernels.hybrid.documents`) are computed once per doc_ids tensor: the
layers of a forward pass share the model's doc_ids, and every angle scan and attention call of
theirs reuses one computation."""

from __future__ import annotations

import pytest
import torch
from conftest import packed_doc_ids

from kernels.hybrid import documents
from kernels.hybrid.documents import cu_seqlens_bounds, document_bounds


def _brute_force(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    starts, ends = torch.zeros_like(doc_ids), torch.zeros_like(doc_ids)
    for b, row in enumerate(doc_ids.tolist()):
        for t, doc in enumerate(row):
            same = [s for s, other in enumerate(row) if other == doc]
            starts[b, t], ends[b, t] = min(same), max(same) + 1
    return starts, ends


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """How many times `document_bounds` computes (each computation walks the ids twice)."""
    calls = []
    real = documents.document_starts

    def counting(doc_ids):
        calls.append(1)
        return real(doc_ids)

    monkeypatch.setattr(documents, "document_starts", counting)
    return calls


def test_bounds_are_computed_once_per_doc_ids_until_modified(counted):
    doc_ids = packed_doc_ids()
    first = document_bounds(doc_ids)
    assert document_bounds(doc_ids) is first and len(counted) == 2
    for found, expected in zip(first, _brute_force(doc_ids), strict=True):
        assert torch.equal(found.long(), expected)
    doc_ids[0, 20:] = 0  # in place: one document in row 0
    starts, ends = document_bounds(doc_ids)
    assert len(counted) == 4 and starts[0].max() == 0 and ends[0].min() == 37
    assert torch.equal(document_bounds(packed_doc_ids())[0], first[0])  # an equal new tensor
    assert len(counted) == 6


def test_inference_tensors_are_not_memoised(counted):
    with torch.inference_mode():
        doc_ids = packed_doc_ids()
        document_bounds(doc_ids)
        doc_ids[0, 20:] = 0
        starts, _ = document_bounds(doc_ids)
    assert len(counted) == 4 and starts[0].max() == 0


def test_cu_seqlens_needs_two_values():
    with pytest.raises(ValueError, match="at least 0 and T"):
        cu_seqlens_bounds(torch.tensor([0]), 70)
