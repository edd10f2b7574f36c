"""Data test helpers: a corpus of real and tricky files, small datasets built once per session,
an independent reader of packed batches, and a rank process for multi-rank loader tests
(`python tests/helpers/data_helpers.py OUT.json` with RANK/WORLD_SIZE/MASTER_* set)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from data.prepare import prepare
from data.shards import read_shard, split_shards

ROOT = Path(__file__).resolve().parents[2]

STDLIB_FILES = ["textwrap.py", "heapq.py", "bisect.py", "this.py", "colorsys.py", "json/decoder.py"]
TRICKY = {
    "unicode.txt": "Grüße, naïve café — 日本語のテキスト 🎉🚀 Ελληνικά русский\nزمان ⊂ ∀x∈ℝ\n",
    "empty.txt": "",
    "crlf.txt": "line one\r\nline two\r\n\ttabbed   spaces  \r\n",
    "eos.txt": "before <|endoftext|> after<|endoftext|>",
    "bom.txt": "\ufeffstarts with a byte order mark",
    "nested/deep/note.md": "# A note\n\nNested two directories down.\n",
    "dup_a.txt": "the same text twice",
    "dup_b.txt": "the same text twice",
}
WORDS = ["alpha", "beta", "gamma", "delta", "lambda", "mu", "über", "naïve", "東京", "\t", "—"]
VOCAB_SIZE = 400
SHARD_SIZE = "8kb"


def synthetic_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300))) + rng.choice(["", "\n"])
        for _ in range(count)
    ]


def write_corpus(directory: Path) -> list[str]:
    """Write the test corpus under `directory`; the documents it holds (any order)."""
    documents = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        text = (stdlib / name).read_bytes().decode()
        (directory / "real" / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / "real" / name).write_bytes(text.encode())
        documents.append(text)
    for name, text in TRICKY.items():
        (directory / "tricky" / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / "tricky" / name).write_bytes(text.encode())
        documents.append(text)
    (directory / "real" / ".hidden.txt").write_text("never read: hidden files are skipped")

    records = [*synthetic_documents(60, seed=1), "", "multi\nline ✓"]
    with open(directory / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(records):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=i % 2 == 0) + "\n")
        f.write("\n")  # a trailing blank line is not a document
    documents += records

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [*synthetic_documents(10, seed=2), "parquet ü"]
    pq.write_table(
        pa.table({"text": rows, "n": list(range(len(rows)))}), directory / "rows.parquet"
    )
    documents += rows
    return documents


def corpus_inputs(directory: Path) -> list[str]:
    """The corpus as --input arguments: a directory, a glob, and two files."""
    return [
        str(directory / "real"),
        str(directory / "tricky" / "**" / "*.*"),
        str(directory / "docs.jsonl"),
        str(directory / "rows.parquet"),
    ]


_BUILT: dict[str, tuple[Path, list[str]]] = {}


def build_dataset(tmp_path_factory, name: str = "corpus", **options) -> tuple[Path, list[str]]:
    """A dataset of the test corpus (built once per session per name): (dir, documents)."""
    if name not in _BUILT:
        root = tmp_path_factory.mktemp(name)
        documents = write_corpus(root / "corpus")
        options = {
            "vocab_size": VOCAB_SIZE,
            "val_fraction": 0.2,
            "shard_size": SHARD_SIZE,
            **options,
        }
        prepare(corpus_inputs(root / "corpus"), root / "dataset", progress=False, **options)
        _BUILT[name] = (root / "dataset", documents)
    return _BUILT[name]


def dataset_files(path: Path) -> dict[str, str]:
    """Every file of a dataset directory, by relative path: the SHA-256 of its bytes."""
    return {
        f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def read_split(dataset: Path, split: str) -> list[np.ndarray]:
    """Every sample of a split, in stored order."""
    split_dir = dataset / split
    return [doc for shard in split_shards(split_dir) for doc in read_shard(split_dir, shard)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, args: dict, tmp: Path, timeout: float = 240) -> list[dict]:
    """Run `rank_main(args)` in `world_size` concurrent processes; their results."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}  # the trap
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=str(ROOT),
        )
        out = tmp / f"rank{rank}.json"
        procs.append(
            (
                out,
                subprocess.Popen(
                    [sys.executable, __file__, json.dumps(args), str(out)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        )
    results = []
    for out, proc in procs:
        log, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, log
        results.append(json.loads(out.read_text()))
    return results


def stream_tokens(documents: list[np.ndarray], orders: list[list[int]]) -> np.ndarray:
    """A logical stream's token sequence: its documents, epoch after epoch, concatenated."""
    return np.concatenate([documents[i] for order in orders for i in order])


def epoch_rows(documents: list[np.ndarray], order: list[int], length: int) -> int:
    """How many rows the first epoch of a stream with this document order has: those whose
    first token (a multiple of `length`) lies in it."""
    tokens = sum(len(documents[i]) for i in order)
    return -(-tokens // length)


def assert_rows_are_windows(batches: list[dict], tokens: np.ndarray, length: int) -> None:
    """Every row of every batch is the stream's tokens [k L, k L + L] for its number k."""
    for batch in batches:
        for k, inputs, targets in zip(
            batch["rows"].tolist(), batch["tokens"], batch["targets"], strict=True
        ):
            row = np.concatenate([inputs.numpy(), targets[-1:].numpy()])
            np.testing.assert_array_equal(row, tokens[k * length : k * length + length + 1])


def rank_main(args: dict) -> dict:
    """One rank: its documents of epochs 0 to 2, its logical streams' document orders of
    epochs 0 to 5 (rank epochs vary in tokens), the rows of an uninterrupted run (numbers and
    tokens), and whether a resumed one continues alike."""
    from data.config import DataConfig
    from data.loader import build_train_loader

    cfg = DataConfig(
        path=args["path"],
        cache_dir=args["cache_dir"],
        packing=args["packing"],
        num_workers=args["num_workers"],
    )
    shape = dict(seq_len=args["seq_len"], batch_size=args["batch_size"], seed=args["seed"])
    k, steps = args["resume_at"], args["steps"]
    with build_train_loader(cfg, **shape) as loader:
        epochs = [loader.epoch_documents(e) for e in range(3)]
        streams = loader.documents.num_streams
        orders = [
            [loader.documents.stream_order(e, s).tolist() for e in range(6)] for s in range(streams)
        ]
        batches = list(itertools.islice(loader, k))
        state = json.loads(json.dumps(loader.state_dict()))
        batches += itertools.islice(loader, steps - k)
    with build_train_loader(cfg, **shape) as loader:
        loader.load_state_dict(state)
        resumed = list(itertools.islice(loader, steps - k))
    return {
        "local_world_size": os.environ.get("LOCAL_WORLD_SIZE"),
        "epochs": epochs,
        "orders": orders,
        "rows": [b["rows"].tolist() for b in batches],
        "tokens": [torch.cat([b["tokens"], b["targets"][:, -1:]], dim=1).tolist() for b in batches],
        "resumed_equal": all(
            all(_same(a[key], b[key]) for key in a)
            for a, b in zip(batches[k:], resumed, strict=True)
        ),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(rank_main(json.loads(sys.argv[1]))))
