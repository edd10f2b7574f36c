"""Rebuild the rotalibi_heldout task's documents: `python -m launch.heldout_task
[--dataset data/default] [--documents 24] [--chars 2000]` (evaluation/heldout_task.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.manifest import DatasetError
from evaluation.heldout_task import OUT, heldout_texts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.heldout_task", description=__doc__)
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
