"""Rebuild the rotalibi_heldout task's documents: `python -m evaluation.heldout_task
[--dataset data/default] [--documents 24] [--chars 2000]`.

The first held-out (val split) documents of a prepared dataset, decoded back to text and cut at
the last line end before --chars characters, written to
evaluation/tasks/rotalibi_heldout/heldout.jsonl (one {"text": ...} per line).
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.heldout_task", description=__doc__)
    parser.add_argument("--dataset", type=Path, default=Path("data/default"))
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--chars", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        texts = heldout_texts(args.dataset, args.documents, args.chars)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    OUT.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    print(f"wrote {len(texts)} documents to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
