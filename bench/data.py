"""Data throughput on this machine: `data.prepare` and the training loader in tokens/s, against
the tiny model's training tokens/s measured in the same run.

    python -m bench.data [--train-steps N]
    python -m bench.data --workers N [--repeats R]

prepare: the default corpus (the stdlib sources) built into a temporary directory, tokenizer
training included. load: `build_train_loader` on that dataset at the tiny config's shape
(16 x 128, boundaries packing, num_workers 0) and at 2 x 4096. train: plain PyTorch forward,
backward and AdamW steps of the tiny model on 16 x 128 loader batches. The issue asks for a
load / train ratio of at least 20. Prints a table and writes bench/results/data_<machine>.json.

--workers N instead times `data.prepare --workers 1` and `--workers N` (the CLI, each in a fresh
interpreter, one after the other; R pairs, the speedup the median pair's) on a 20 MB jsonl of
the stdlib's .py sources with a tokenizer trained beforehand on its first 2 MB (so both time
reading, tokenizing and writing), checks that the datasets are byte-identical, and writes
bench/results/data_workers_<machine>.json: wall times, speedups, each run's CPU seconds in the
main process and in its workers, and the load average before (timings on a busy machine are
noise). The issue asks for a speedup of at least
1.6 with 2 workers on 2 cores (80% of linear: required 0.8 N).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from bench import machine, write_result
from data.config import DataConfig
from data.default_corpus import VAL_FRACTION, VOCAB_SIZE, default_corpus_files
from data.loader import build_train_loader
from data.manifest import read_manifest
from data.prepare import DEFAULT_VOCAB_SIZE, prepare
from data.tokenizer import train_tokenizer
from model import Transformer
from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_RATIO = 20
WORKERS_CORPUS_BYTES = 20_000_000
TOKENIZER_CORPUS_BYTES = 2_000_000
PARALLEL_EFFICIENCY = 0.8  # the 1.6x for 2 workers
# data.prepare's CLI, reporting the CPU seconds of its main process and of its workers.
PREPARE_CLI = """import json, resource, sys
from data.prepare import main
code = main(sys.argv[1:])
own, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps([own.ru_utime + own.ru_stime, workers.ru_utime + workers.ru_stime]))
sys.exit(code)
"""


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


def write_stdlib_jsonl(file: Path, limit: int) -> list[str]:
    """A jsonl of the stdlib's UTF-8 .py sources (site-packages aside), sorted by path, up to
    `limit` bytes of text; the documents."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    relative = (f.relative_to(stdlib) for f in stdlib.rglob("*.py"))
    sources = sorted(
        r.as_posix() for r in relative if not {"site-packages", "dist-packages"} & set(r.parts)
    )
    documents, size = [], 0
    with file.open("w", encoding="utf-8") as out:
        for source in sources:
            try:
                text = (stdlib / source).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            out.write(json.dumps({"text": text}) + "\n")
            documents.append(text)
            size += len(text.encode())
            if size >= limit:
                break
    return documents


def timed_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict[str, float]:
    """Wall seconds and CPU seconds (main process, workers) of one data.prepare CLI run."""
    command = [sys.executable, "-c", PREPARE_CLI, "--input", str(corpus), "--output", str(out)]
    command += ["--tokenizer", str(tokenizer), "--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"data.prepare --workers {workers} failed:\n{run.stderr}")
    main_cpu, workers_cpu = json.loads(run.stdout.splitlines()[-1])
    return {"wall_s": seconds, "main_cpu_s": main_cpu, "workers_cpu_s": workers_cpu}


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        f.relative_to(directory).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def workers_main(workers: int, repeats: int) -> int:
    """The --workers comparison (see the module doc)."""
    load = os.getloadavg()[0]  # other work on the machine makes the timings noise
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stdlib.jsonl"
        documents = write_stdlib_jsonl(corpus, WORKERS_CORPUS_BYTES)
        corpus_bytes = corpus.stat().st_size
        sizes = itertools.accumulate(len(text.encode()) for text in documents)
        sample = documents[: sum(size <= TOKENIZER_CORPUS_BYTES for size in sizes)]
        tokenizer = Path(tmp) / "tokenizer.json"
        train_tokenizer(sample, DEFAULT_VOCAB_SIZE).save(str(tokenizer))
        runs: dict[int, list[dict[str, float]]] = {1: [], workers: []}
        identical = True
        for r in range(repeats):
            for n in runs:
                out = Path(tmp) / f"r{r}w{n}"
                runs[n].append(timed_prepare(corpus, tokenizer, out, n))
            identical &= file_hashes(Path(tmp) / f"r{r}w1") == file_hashes(out)
            manifest = read_manifest(out)
            for n in runs:
                shutil.rmtree(Path(tmp) / f"r{r}w{n}")
    speedups = [one["wall_s"] / many["wall_s"] for one, many in zip(*runs.values(), strict=True)]
    speedup = statistics.median(speedups)
    required = PARALLEL_EFFICIENCY * workers
    result = {
        "machine": machine(),
        "torch": torch.__version__,
        "load_average_before": load,
        "corpus_bytes": corpus_bytes,
        "documents": len(documents),
        "tokens": manifest["train"]["tokens"] + manifest["val"]["tokens"],
        "vocab_size": manifest["vocab_size"],
        "workers": workers,
        **{
            f"{key}_workers_{n}": [run[key] for run in done]
            for n, done in runs.items()
            for key in done[0]
        },
        "speedups": speedups,
        "speedup": speedup,
        "required_speedup": required,
        "byte_identical": identical,
    }
    print(f"{'data.prepare':<24}{'wall s':>10}{'main CPU s':>12}{'workers CPU s':>15}")
    for n, done in runs.items():
        for run in done:
            print(
                f"{f'--workers {n}':<24}{run['wall_s']:>10.2f}{run['main_cpu_s']:>12.2f}"
                f"{run['workers_cpu_s']:>15.2f}"
            )
    verdict = "ok" if speedup >= required else "TOO SLOW"
    pairs = ", ".join(f"{x:.2f}" for x in speedups)
    print(f"speedup: {speedup:.2f}x, the median of {pairs} (required >= {required:.1f}x: ", end="")
    print(f"{verdict}); " + ("outputs byte-identical" if identical else "OUTPUTS DIFFER"))
    write_result("data_workers", result)
    return 0 if identical and speedup >= required else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument(
        "--workers", type=int, metavar="N", help="time data.prepare --workers 1 against N instead"
    )
    parser.add_argument("--repeats", type=int, default=3, help="with --workers: pairs of runs")
    args = parser.parse_args(argv)
    if args.workers is not None:
        return workers_main(args.workers, args.repeats)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_rate(Path(tmp) / "dataset")
        cfg = DataConfig(path=str(Path(tmp) / "dataset"), cache_dir=str(Path(tmp) / "cache"))
        load = load_rate(cfg, 128, 16)
        load_long = load_rate(cfg, 4096, 2)
        train = train_rate(cfg, args.train_steps)
    ratio = load / train
    result = {
        "machine": machine(),
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
    write_result("data", result)
    return 0 if ratio >= REQUIRED_RATIO else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
