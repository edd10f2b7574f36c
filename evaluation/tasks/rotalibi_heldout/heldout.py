"""The documents of the rotalibi_heldout task: heldout.jsonl beside this file, no download."""

import json
from pathlib import Path

import datasets


def documents(**_) -> dict[str, datasets.Dataset]:
    """The task's one split, `test` (lm-eval's custom_dataset hook)."""
    lines = Path(__file__).with_name("heldout.jsonl").read_text().splitlines()
    return {"test": datasets.Dataset.from_list([json.loads(line) for line in lines])}
