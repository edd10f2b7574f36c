"""Data throughput on this machine: `data.prepare` and the training loader in tokens/s, against
the tiny model's training tokens/s measured in the same run.

    python -m bench.data [--train-steps N]

prepare: the default corpus (the stdlib sources) built into a temporary directory, tokenizer
training included. load: `build_train_loader` on that dataset at the tiny config's shape
(16 x 128, boundaries packing, num_workers 0) and at 2 x 4096. train: plain PyTorch forward,
backward and AdamW steps of the tiny model on 16 x 128 loader batches. The issue asks for a
load / train ratio of at least 20. Prints a table and writes bench/results/data_<machine>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.default_corpus import VAL_FRACTION, VOCAB_SIZE, default_corpus_files
from data.loader import build_train_loader
from data.prepare import prepare
from launch.config import DataConfig, load_config
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_RATIO = 20


def prepare_rate(out: Path) -> float:
    """Tokens/s of building the default corpus from scratch."""
    files = [str(f) for f in default_corpus_files()]
    start = time.perf_counter()
    manifest = prepare(files, out, vocab_size=VOCAB_SIZE, val_fraction=VAL_FRACTION, progress=False)
    seconds = time.perf_counter() - start
    return (manifest["train"]["tokens"] + manifest["val"]["tokens"]) / seconds


def load_rate(cfg: DataConfig, seq_len: int, batch_size: int, seconds: float = 3.0) -> float:
    """Tokens/s of the loader over at least `seconds` (after a warm-up batch)."""
    with build_train_loader(cfg, seq_len=seq_len, batch_size=batch_size, seed=0) as loader:
        next(loader)
        batches, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(50):
                next(loader)
            batches += 50
        elapsed = time.perf_counter() - start
    return batches * seq_len * batch_size / elapsed


def train_rate(cfg: DataConfig, steps: int, warmup: int = 3) -> float:
    """Tokens/s of plain forward + backward + AdamW steps of the tiny model on 16 x 128."""
    model_cfg = load_config(ROOT / "configs" / "tiny.yaml").model
    torch.manual_seed(0)
    model = Transformer(model_cfg, train_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with build_train_loader(cfg, seq_len=128, batch_size=16, seed=0) as loader:
        batches = list(itertools.islice(loader, warmup + steps))
    for step, batch in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        model.loss(batch["tokens"], batch["targets"], batch["doc_ids"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * 16 * 128 / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__)
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_rate(Path(tmp) / "dataset")
        cfg = DataConfig(path=str(Path(tmp) / "dataset"), cache_dir=str(Path(tmp) / "cache"))
        load = load_rate(cfg, 128, 16)
        load_long = load_rate(cfg, 4096, 2)
        train = train_rate(cfg, args.train_steps)
    ratio = load / train
    result = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.processor()})",
        "torch": torch.__version__,
        "prepare_tokens_per_s": prepared,
        "load_tokens_per_s_16x128": load,
        "load_tokens_per_s_2x4096": load_long,
        "tiny_train_tokens_per_s_16x128": train,
        "load_over_train": ratio,
        "required_ratio": REQUIRED_RATIO,
    }
    print(f"{'path':<36}{'tokens/s':>14}")
    print(f"{'prepare (default corpus)':<36}{prepared:>14,.0f}")
    print(f"{'load 16 x 128':<36}{load:>14,.0f}")
    print(f"{'load 2 x 4096':<36}{load_long:>14,.0f}")
    print(f"{'train tiny model 16 x 128':<36}{train:>14,.0f}")
    verdict = "ok" if ratio >= REQUIRED_RATIO else "TOO SLOW"
    print(f"load / train: {ratio:,.0f}x (required >= {REQUIRED_RATIO}x: {verdict})")
    out = ROOT / "bench" / "results" / f"data_{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0 if ratio >= REQUIRED_RATIO else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
