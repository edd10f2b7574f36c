"""`python -m data.prepare`: text to a dataset directory (tokenizer.json, MDS shards, manifest).

    python -m data.prepare --input PATH [PATH ...] --output DIR
        [--vocab-size N | --tokenizer FILE|DIR [--eos-token TOKEN]] [--workers N]
        [--val-fraction F] [--seed S] [--text-field NAME] [--shard-size BYTES] [--overwrite]

Inputs are files, directories (walked recursively, hidden entries skipped) and globs. A plain
text file is one document; a line of a `.jsonl`, `.jsonl.gz` or `.jsonl.zst` file, a row of a
`.parquet` file or of a `datasets` save_to_disk directory (one input, not walked; needs `pip
install datasets`; of a DatasetDict, pass a split's directory) is one (its --text-field).
With no --tokenizer (a tokenizer.json, or a directory holding one), a byte-level BPE tokenizer
of --vocab-size tokens is trained on the documents. Each document becomes one MDS sample,
column `tokens` = its ids + EOS (uint16 when the vocabulary fits, else uint32), in DIR/train or
DIR/val by a hash of its text (a stable split); each split also keeps every document's token
count (lengths.npy). Shards are zstd compressed with xxh64 checksums.

--workers processes (default: the CPUs this process may use) decode and tokenize batches of
documents, one core each; this process reads the inputs and writes the shards in input order,
so the dataset is the same, byte for byte, whatever --workers.

The dataset is built in a hidden temporary directory beside DIR and renamed into place when
complete, so no half-written dataset is ever found at DIR (a build stopped by a signal removes
it). Re-running with the same inputs and options finds DIR up to date and does nothing;
different ones stop with an error unless --overwrite (which only ever replaces a dataset). DIR
may not lie inside an input directory, whose files it would become.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from data.manifest import (
    FORMAT,
    LENGTHS,
    MANIFEST,
    SPLITS,
    DatasetError,
    read_manifest,
    write_manifest,
)
from data.sources import (
    Chunk,
    decode_chunk,
    file_digest,
    input_size,
    read_chunks,
    resolve_inputs,
)
from data.tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    TOKENIZER_FILE,
    eos_id,
    read_tokenizer_file,
    tokenizer_path,
    train_tokenizer,
)

DEFAULT_VOCAB_SIZE = 32768
STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
MAX_VOCAB_SIZE = 1 << 20  # the tokenizer trainer allocates by the vocabulary size asked for
ENCODE_BATCH_BYTES = 1 << 20  # input handed to a worker at once (a text file may be more)
SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}
MAX_SHARD_SIZE = 1 << 32  # MDS shards index their samples with 32-bit offsets
QUEUED_PER_WORKER = 8  # batches handed out per worker: seconds of work, while streaming imports
# Workers run this much nicer than the main process, whose serial work (importing streaming
# first) every batch waits for: on 2 cores it keeps one (bench.data --workers 2: 1.40x, now 1.58x).
WORKER_NICENESS = 10
# Encoded batches: every document's ids + EOS, concatenated; its token count; whether in val.
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def prepare(
    inputs: Sequence[str],
    output: str | Path,
    *,
    vocab_size: int | None = None,
    tokenizer_file: str | Path | None = None,
    eos_token: str = EOS_TOKEN,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    shard_size: str | int = "64mb",
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Build the dataset directory `output` from `inputs` (see the module doc); its manifest.
    `workers`: tokenizing processes (None: default_workers())."""
    if vocab_size is not None and tokenizer_file is not None:
        raise DatasetError("give --vocab-size (train a tokenizer) or --tokenizer FILE, not both")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DatasetError(f"--workers {workers} is not a number of processes: give 1 or more")
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if vocab_size is None and tokenizer_file is None:
        vocab_size = DEFAULT_VOCAB_SIZE
    _shard_bytes(shard_size)
    output = Path(output)
    files = resolve_inputs(inputs)
    _check_output_outside_inputs(output, inputs, files)
    if vocab_size is not None:
        _check_vocab_size(vocab_size, files)
    options = {
        "vocab_size": vocab_size,
        "tokenizer_sha256": (
            hashlib.sha256(tokenizer_path(tokenizer_file).read_bytes()).hexdigest()
            if tokenizer_file
            else None
        ),
        "eos_token": eos_token,
        "val_fraction": val_fraction,
        "seed": seed,
        "text_field": text_field,
        "shard_size": shard_size,
    }
    fingerprint = hashlib.sha256(
        json.dumps({"format": FORMAT, "inputs": file_digest(files), **options}).encode()
    ).hexdigest()
    current = _current_dataset(output, fingerprint, overwrite)
    if current is not None:
        print(f"{output} is up to date ({_summary(current)})", file=sys.stderr)
        return current

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(output)
    host = socket.gethostname()
    # A stop signal waits until the clean-up below is armed: never a partial build left behind.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{output.name}.partial-{host}-{os.getpid()}-", dir=output.parent)
    )
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the dataset private
        start = time.perf_counter()
        manifest = _build(files, staging, tokenizer_file, options, fingerprint, progress, workers)
        seconds = time.perf_counter() - start
        manifest = _install(staging, output, manifest, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tokens = manifest["train"]["tokens"] + manifest["val"]["tokens"]
    rate = f"{tokens / seconds:,.0f} tokens/s"
    print(f"wrote {output} ({_summary(manifest)}) in {seconds:.1f}s, {rate}", file=sys.stderr)
    return manifest


def default_workers() -> int:
    """The CPUs this process may run on (its affinity: a SLURM or container limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _shard_bytes(shard_size: str | int) -> int:
    """--shard-size in bytes: a number of bytes, or one with a unit (b, kb, mb, gb: powers of
    1024, as streaming reads them); below MAX_SHARD_SIZE. (Parsed here, not by streaming, whose
    import takes seconds: the build imports it while the workers start encoding.)"""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmg]?b)?\s*", str(shard_size).lower())
    size = int(float(match[1]) * SIZE_UNITS[match[2] or "b"]) if match else 0
    if not 0 < size < MAX_SHARD_SIZE:
        raise DatasetError(
            f"--shard-size {shard_size!r} is not a size: give bytes or a number with a unit, "
            "e.g. 64mb (below 4gb)"
        )
    return size


def _check_vocab_size(vocab_size: int, files: list[Path]) -> None:
    """A vocabulary the corpus can fill (every token beyond the bytes and EOS is a merge of two
    adjacent ones), and at most MAX_VOCAB_SIZE."""
    # A compressed input counts its compressed bytes; a bad one fails later.
    corpus_bytes = sum(input_size(f) for f in files if f.exists())
    limit = min(MAX_VOCAB_SIZE, MIN_VOCAB_SIZE + corpus_bytes)
    if vocab_size > limit:
        why = (
            f"the maximum is {MAX_VOCAB_SIZE:,}"
            if limit == MAX_VOCAB_SIZE
            else f"{corpus_bytes:,} bytes of input give at most {limit:,} tokens"
        )
        raise DatasetError(f"--vocab-size {vocab_size:,} is too large: {why}")


def _check_output_outside_inputs(output: Path, inputs: Sequence[str], files: list[Path]) -> None:
    """The dataset must not be built inside a directory it reads (nor read its own files)."""
    target = output.resolve()
    for given in inputs:
        path = Path(given)
        if path.is_dir() and target.is_relative_to(path.resolve()):
            raise DatasetError(
                f"--output {output} is inside the input directory {given}, whose files it "
                "would become; choose an --output outside the inputs"
            )
    inside = [f for f in files if f.resolve().is_relative_to(target)]
    if inside:
        raise DatasetError(
            f"input {inside[0]} is inside --output {output}: the dataset would read its own "
            "files; choose an --output outside the inputs"
        )


def _summary(manifest: dict[str, Any]) -> str:
    train, val = manifest["train"], manifest["val"]
    return (
        f"vocab {manifest['vocab_size']}; train {train['documents']} documents, "
        f"{train['tokens']:,} tokens; val {val['documents']} documents, {val['tokens']:,} tokens"
    )


def _current_dataset(output: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest at `output` when it is this very dataset; None when `output` may be
    (re)built; DatasetError when building would destroy something else."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise DatasetError(f"--output {output} is a file; choose a directory")
    if not (output / MANIFEST).is_file():
        if any(output.iterdir()):
            raise DatasetError(
                f"--output {output} is a non-empty directory that is not a dataset "
                f"(no {MANIFEST}); choose another --output or empty it"
            )
        return None
    manifest = read_manifest(output)
    if manifest.get("fingerprint") == fingerprint:
        return manifest
    if overwrite:
        return None
    raise DatasetError(
        f"--output {output} already holds a different dataset (built from other inputs or "
        f"options); choose another --output, delete it, or pass --overwrite to replace it"
    )


def _remove_abandoned_builds(output: Path) -> None:
    """Delete staging directories of builds on this host whose process is gone (killed)."""
    host = socket.gethostname()
    for staging in output.parent.glob(f".{output.name}.partial-{host}-*"):
        pid = staging.name.removeprefix(f".{output.name}.partial-{host}-").split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _chunks(files: list[Path], text_field: str) -> Iterator[Chunk]:
    for file in files:
        yield from read_chunks(file, text_field, ENCODE_BATCH_BYTES)


def _progress(files: list[Path], progress: bool, desc: str) -> tqdm:
    total = sum(input_size(f) for f in files)
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)


def _documents(files: list[Path], text_field: str, progress: bool, desc: str) -> Iterator[str]:
    with _progress(files, progress, desc) as bar:
        for chunk in _chunks(files, text_field):
            yield from decode_chunk(chunk, text_field)
            bar.update(chunk.size)


def _batches(chunks: Iterable[Chunk]) -> Iterator[list[Chunk]]:
    batch, size = [], 0
    for chunk in chunks:
        batch.append(chunk)
        size += chunk.nbytes
        if size >= ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _in_val(text: str, seed: int, val_fraction: float) -> bool:
    """The stable split: a keyed hash of the document's text, uniform in [0, 1)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class _Encoder:
    """A batch of chunks to its documents' tokens, token counts and splits (Encoded). Made from
    the tokenizer's file, not the tokenizer: what a worker is sent stays small (a worker that
    died starting would block a send larger than a pipe's buffer forever)."""

    def __init__(self, tokenizer_file: Path, eos: int, dtype: type, options: dict[str, Any]):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.eos, self.dtype, self.text_field = eos, dtype, options["text_field"]
        self.seed, self.val_fraction = options["seed"], options["val_fraction"]

    def __call__(self, batch: list[Chunk]) -> Encoded:
        texts = [text for chunk in batch for text in decode_chunk(chunk, self.text_field)]
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        counts = np.array([len(i) + 1 for i in ids], np.uint32)
        tokens = itertools.chain.from_iterable([*i, self.eos] for i in ids)
        in_val = [_in_val(text, self.seed, self.val_fraction) for text in texts]
        return np.fromiter(tokens, self.dtype, int(counts.sum())), counts, np.array(in_val, bool)


_WORKER_ENCODER: _Encoder | None = None  # a worker process's, set by _start_worker


def _start_worker(*encoder_args: Any) -> None:
    """A worker process: one core (no tokenizers threads), yielding to the main process
    (WORKER_NICENESS); Ctrl-C is the main process's to handle (it ends the workers)."""
    global _WORKER_ENCODER
    os.environ.update(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    os.nice(WORKER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_ENCODER = _Encoder(*encoder_args)


def _encode_in_worker(batch: list[Chunk]) -> Encoded:
    return _WORKER_ENCODER(batch)


@contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """HF tokenizers on this thread alone meanwhile (it reads the variable at every call)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


@contextmanager
def _encoding(
    batches: Iterator[list[Chunk]], encoder_args: tuple[Any, ...], workers: int
) -> Iterator[Iterator[tuple[int, Encoded]]]:
    """Every batch's input bytes and Encoded (by `_Encoder(*encoder_args)`), in input order:
    from `workers` spawned processes (QUEUED_PER_WORKER batches each handed out ahead), or from
    this process when one worker is asked for or the inputs are a single batch."""
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    if workers == 1 or len(head) < 2:
        encoder = _Encoder(*encoder_args)
        with _serial_tokenizers():
            yield ((_batch_size(batch), encoder(batch)) for batch in batches)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded process
        initializer=_start_worker,
        initargs=encoder_args,
    )
    try:
        # Handed out at once: the workers start while this process goes on (importing streaming).
        first = itertools.islice(batches, QUEUED_PER_WORKER * workers)
        yield _in_order(pool, batches, deque(_submit(pool, batch) for batch in first))
    except BrokenProcessPool:
        raise DatasetError(
            "a worker process died (killed, or out of memory?); run again, with fewer --workers "
            "if memory is short"
        ) from None
    finally:
        pool.shutdown(cancel_futures=True)  # stopped or failed: the batches being encoded end


def _submit(pool: ProcessPoolExecutor, batch: list[Chunk]) -> tuple[int, Future[Encoded]]:
    return _batch_size(batch), pool.submit(_encode_in_worker, batch)


def _in_order(
    pool: ProcessPoolExecutor,
    batches: Iterator[list[Chunk]],
    pending: deque[tuple[int, Future[Encoded]]],
) -> Iterator[tuple[int, Encoded]]:
    """The results of the `pending` batches then of `batches`, in order, keeping as many
    handed out."""
    while pending:
        size, result = pending.popleft()
        pending.extend(_submit(pool, batch) for batch in itertools.islice(batches, 1))
        yield size, result.result()


def _batch_size(batch: list[Chunk]) -> int:
    return sum(chunk.size for chunk in batch)


def _build(
    files: list[Path],
    staging: Path,
    tokenizer_file: str | Path | None,
    options: dict[str, Any],
    fingerprint: str,
    progress: bool,
    workers: int,
) -> dict[str, Any]:
    text_field = options["text_field"]
    if tokenizer_file is not None:
        tokenizer = read_tokenizer_file(tokenizer_file)
    else:
        documents = _documents(files, text_field, progress, "training tokenizer")
        tokenizer = train_tokenizer(documents, options["vocab_size"])
    eos = eos_id(tokenizer, options["eos_token"])
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32

    tokenizer.save(str(staging / TOKENIZER_FILE))
    encoder_args = (staging / TOKENIZER_FILE, eos, dtype, options)
    batches = _batches(_chunks(files, text_field))
    lengths: dict[str, list[int]] = {split: [] for split in SPLITS}
    with (
        _progress(files, progress, "tokenizing") as bar,
        _encoding(batches, encoder_args, workers) as encoded,
    ):
        writers = _writers(staging, dtype, _shard_bytes(options["shard_size"]))
        for size, (tokens, counts, in_val) in encoded:
            end = 0
            for count, val in zip(counts.tolist(), in_val.tolist(), strict=True):
                split = "val" if val else "train"
                writers[split].write({"tokens": tokens[end : end + count]})
                lengths[split].append(count)
                end += count
            bar.update(size)
    for writer in writers.values():
        writer.finish()

    documents = sum(map(len, lengths.values()))
    if not lengths["train"] or (options["val_fraction"] > 0 and not lengths["val"]):
        empty = "train" if not lengths["train"] else "val"
        raise DatasetError(
            f"no document fell into the {empty} split ({documents} documents, --val-fraction "
            f"{options['val_fraction']}); give more documents or another --val-fraction"
        )
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "vocab_size": vocab_size,
        "eos_id": eos,
        "eos_token": options["eos_token"],
        "dtype": np.dtype(dtype).name,
        "tokenizer_sha256": hashlib.sha256((staging / TOKENIZER_FILE).read_bytes()).hexdigest(),
        "input_files": len(files),
        **{k: options[k] for k in ("val_fraction", "seed", "text_field")},
        **{split: _split_summary(staging / split, lengths[split]) for split in SPLITS},
    }
    write_manifest(staging, manifest)
    return manifest


def _writers(staging: Path, dtype: type, shard_bytes: int) -> dict[str, Any]:
    """An MDS writer for each split."""
    from streaming import MDSWriter  # seconds (it imports torch and transformers)

    return {
        split: MDSWriter(
            out=str(staging / split),
            columns={"tokens": f"ndarray:{np.dtype(dtype).name}"},
            compression="zstd",
            hashes=["xxh64"],
            size_limit=shard_bytes,
        )
        for split in SPLITS
    }


def _split_summary(split_dir: Path, lengths: list[int]) -> dict[str, Any]:
    """Write the split's document lengths (LENGTHS: packing finds rows by them); its documents,
    tokens, and tokens per shard (for seeking)."""
    np.save(split_dir / LENGTHS, np.array(lengths, np.uint32), allow_pickle=False)
    index = json.loads((split_dir / "index.json").read_text())
    bounds = np.cumsum([0] + [shard["samples"] for shard in index["shards"]])
    cumulative = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    shard_tokens = np.diff(cumulative[bounds]).tolist()
    return {"documents": len(lengths), "tokens": int(cumulative[-1]), "shard_tokens": shard_tokens}


def _install(
    staging: Path, output: Path, manifest: dict[str, Any], overwrite: bool
) -> dict[str, Any]:
    """Rename the finished dataset into place (replacing an old one only with overwrite)."""
    replaced = None
    if overwrite and (output / MANIFEST).is_file():
        replaced = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        output.rename(replaced)
    try:
        staging.rename(output)  # atomic; replaces an empty directory
    except OSError:
        if replaced is not None and not output.exists():  # the old dataset back, not lost
            replaced.rename(output)
            replaced = None
            raise
        # Another build of the same output finished first: fine if it is this dataset.
        if _current_dataset(output, manifest["fingerprint"], overwrite=False) is None:
            raise
        return read_manifest(output)
    finally:
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    return manifest


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="files, directories, globs"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the dataset directory")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument(
        "--vocab-size", type=int, help=f"train a tokenizer (default {DEFAULT_VOCAB_SIZE})"
    )
    vocab.add_argument(
        "--tokenizer", metavar="FILE|DIR", help="use this tokenizer.json (or DIR/tokenizer.json)"
    )
    parser.add_argument("--eos-token", default=EOS_TOKEN, help="with --tokenizer: its EOS token")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="default 0.05")
    parser.add_argument("--seed", type=int, default=0, help="keys the train/val hash (default 0)")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    parser.add_argument("--shard-size", default="64mb", help="uncompressed shard size limit")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"tokenizing processes (default: the CPUs this process may use, {default_workers()})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for stop in STOP_SIGNALS - {signal.SIGINT}:  # unwind (as Ctrl-C does), removing the build
        signal.signal(stop, _exit_on_signal)
    try:
        prepare(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            tokenizer_file=args.tokenizer,
            eos_token=args.eos_token,
            val_fraction=args.val_fraction,
            seed=args.seed,
            text_field=args.text_field,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            workers=args.workers,
        )
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
