"""The rotalibi_heldout task's documents, evaluation/tasks/rotalibi_heldout/heldout.jsonl (one
{"text": ...} per line, rebuilt by `python -m launch.heldout_task`): the first held-out (val
split) documents of a prepared dataset, decoded back to text and cut at a line end.
"""

from __future__ import annotations

from pathlib import Path

from data.manifest import DatasetError
from data.shards import read_shard, split_shards
from data.tokenizer import decode_document, load_tokenizer

OUT = Path(__file__).parent / "tasks" / "rotalibi_heldout" / "heldout.jsonl"


def heldout_texts(dataset: Path, documents: int, chars: int) -> list[str]:
    """The first `documents` val documents of `dataset` with text, each at most `chars` long."""
    tokenizer = load_tokenizer(dataset)
    texts: list[str] = []
    for shard in split_shards(dataset / "val"):
        for ids in read_shard(dataset / "val", shard):
            text = decode_document(tokenizer, ids.tolist())
            cut = text if len(text) <= chars else text[: text.rfind("\n", 0, chars) + 1]
            if cut.strip():
                texts.append(cut)
            if len(texts) == documents:
                return texts
    raise DatasetError(f"the val split of {dataset} has only {len(texts)} documents with text")
