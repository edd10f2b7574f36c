"""data.prepare: exact round trip of real files, stable split, idempotence, the same bytes
whatever --workers, every input format giving the same tokens, clear errors on bad input, and
never a half-written dataset (nor a worker left running) at the output path."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import zstandard
from data_helpers import (
    TRICKY,
    build_dataset,
    corpus_inputs,
    dataset_files,
    read_split,
    synthetic_documents,
    write_corpus,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import data.prepare
import data.sources
from data.default_corpus import EXCLUDED_DIRS, default_corpus_files
from data.manifest import SPLITS, DatasetError, read_manifest
from data.prepare import WORKER_NICENESS, main, prepare
from data.sources import resolve_inputs
from data.tokenizer import EOS_TOKEN, decode_document, load_tokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory)


def decoded_samples(path: Path) -> dict[str, list[str]]:
    tokenizer = load_tokenizer(path)
    return {
        split: [decode_document(tokenizer, d) for d in read_split(path, split)]
        for split in ("train", "val")
    }


def test_round_trip_gives_back_every_document(dataset):
    path, documents = dataset
    manifest = read_manifest(path)
    samples = {split: read_split(path, split) for split in ("train", "val")}
    decoded = decoded_samples(path)
    assert Counter(decoded["train"] + decoded["val"]) == Counter(documents)
    assert "" in decoded["train"] + decoded["val"]  # the empty file: a document of EOS alone
    for split, docs in samples.items():
        assert all(d.dtype == np.uint16 and d[-1] == manifest["eos_id"] for d in docs)
        assert manifest[split]["documents"] == len(docs)
        assert (
            manifest[split]["tokens"] == sum(map(len, docs)) == sum(manifest[split]["shard_tokens"])
        )
        lengths = np.load(path / split / "lengths.npy", allow_pickle=False)
        assert lengths.tolist() == [len(d) for d in docs]  # what packing lays rows out by
    assert len(manifest["train"]["shard_tokens"]) > 1  # the corpus spans several shards
    assert manifest["vocab_size"] == load_tokenizer(path).get_vocab_size() == 400


def test_split_is_a_stable_hash_of_the_text(dataset, tmp_path):
    path, documents = dataset
    before = decoded_samples(path)
    extra = tmp_path / "extra.txt"
    extra.write_text("one more document")
    corpus = path.parent / "corpus"
    bigger = prepare(
        [*corpus_inputs(corpus), str(extra)],
        tmp_path / "bigger",
        vocab_size=400,
        val_fraction=0.2,
        shard_size="8kb",
        progress=False,
    )
    after = decoded_samples(tmp_path / "bigger")
    for split in ("train", "val"):
        assert set(before[split]) <= set(after[split])  # no document changed sides
    assert before["val"] and before["train"]
    assert bigger["train"]["documents"] + bigger["val"]["documents"] == len(documents) + 1


def test_same_inputs_same_bytes_and_second_run_does_nothing(dataset, tmp_path):
    path, _ = dataset
    corpus = path.parent / "corpus"
    again = tmp_path / "again"
    options = dict(vocab_size=400, val_fraction=0.2, shard_size="8kb", progress=False)
    prepare(corpus_inputs(corpus), again, **options)
    assert dataset_files(again) == dataset_files(path)

    stamp = (again / "dataset.json").stat().st_mtime_ns
    assert prepare(corpus_inputs(corpus), again, **options) == read_manifest(again)
    assert (again / "dataset.json").stat().st_mtime_ns == stamp


def test_output_holding_another_dataset_is_refused_then_replaced_on_request(dataset, tmp_path):
    path, _ = dataset
    corpus = path.parent / "corpus"
    out = tmp_path / "out"
    shutil.copytree(path, out)
    with pytest.raises(DatasetError, match=r"already holds a different dataset.*--overwrite"):
        prepare([str(corpus / "real")], out, vocab_size=300, progress=False)
    assert read_manifest(out) == read_manifest(path)  # untouched

    def replace():
        return prepare(
            [str(corpus / "real")],
            out,
            vocab_size=300,
            val_fraction=0.3,
            progress=False,
            overwrite=True,
        )

    # Installing the new dataset fails (a full disk, say): the old one stays in place.
    rename = Path.rename

    def failing_install(self, target):
        if ".partial-" in self.name:
            raise OSError(28, "No space left on device")
        return rename(self, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "rename", failing_install)
        with pytest.raises(OSError, match="No space left"):
            replace()
    assert read_manifest(out) == read_manifest(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    manifest = replace()
    assert read_manifest(out) == manifest and manifest["vocab_size"] == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a dataset"):
        prepare([str(corpus / "real")], stranger, vocab_size=300, overwrite=True, progress=False)
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]


def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    (root / "empty_dir").mkdir(parents=True)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "field.jsonl").write_text('{"body": "no text field"}\n')
    (root / "bytes.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    (root / "with_broken_link").mkdir()
    (root / "with_broken_link" / "ok.txt").write_text("fine")
    (root / "with_broken_link" / "gone.txt").symlink_to(root / "does_not_exist.txt")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), root / "col.parquet")
    (root / "fake.parquet").write_text("not parquet")
    (root / "bad.jsonl.gz").write_bytes(gzip.compress((root / "bad.jsonl").read_bytes()))
    (root / "bytes.jsonl.zst").write_bytes(zstandard.compress((root / "bytes.jsonl").read_bytes()))
    (root / "fake.jsonl.gz").write_text('{"text": "not compressed"}\n')
    return {
        "glob": ([str(root / "*.nothing")], "no files matched"),
        "missing": ([str(root / "nope.txt")], "does not exist"),
        "empty dir": ([str(root / "empty_dir")], "no files matched"),
        "unreadable": ([str(root / "with_broken_link")], "cannot read input .*gone.txt"),
        "latin-1": ([str(root / "latin1.txt")], "latin1.txt is not valid UTF-8 .*byte 3"),
        "json": ([str(root / "bad.jsonl")], "bad.jsonl line 2 is not valid JSON"),
        "field": ([str(root / "field.jsonl")], "no field 'text' .*body.*--text-field"),
        "jsonl utf-8": ([str(root / "bytes.jsonl")], "bytes.jsonl line 2 is not valid UTF-8"),
        "column": ([str(root / "col.parquet")], "no column 'text' .*body"),
        "parquet": ([str(root / "fake.parquet")], "cannot read parquet input"),
        "gzip json": ([str(root / "bad.jsonl.gz")], "bad.jsonl.gz line 2 is not valid JSON"),
        "zstd utf-8": ([str(root / "bytes.jsonl.zst")], "zst line 2 is not valid UTF-8"),
        "gzip": ([str(root / "fake.jsonl.gz")], "cannot read input .*fake.jsonl.gz"),
    }


@pytest.mark.parametrize("tokenizer", [False, True], ids=["train tokenizer", "given tokenizer"])
def test_bad_input_is_a_clear_error_and_leaves_nothing(dataset, tmp_path, tokenizer):
    path, _ = dataset
    options = {"tokenizer_file": path / "tokenizer.json"} if tokenizer else {"vocab_size": 300}
    good = str(path.parent / "corpus" / "real")
    for name, (inputs, message) in _bad_inputs(tmp_path / "in").items():
        out = tmp_path / "out"
        # The bad input comes last, after good documents were already encoded and written.
        with pytest.raises(DatasetError, match=message):
            prepare([good, *inputs], out, progress=False, **options)
        assert not out.exists(), name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], name


def test_abandoned_build_of_a_killed_run_is_removed(dataset, tmp_path):
    path, _ = dataset
    out = tmp_path / "out"
    host = os.uname().nodename
    abandoned = tmp_path / f".out.partial-{host}-999999999-x"  # no such process
    abandoned.mkdir()
    (abandoned / "train").mkdir()
    prepare(
        [str(path.parent / "corpus" / "real")],
        out,
        vocab_size=300,
        val_fraction=0.3,
        progress=False,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_options_are_clear_errors(dataset, tmp_path):
    path, _ = dataset
    real = [str(path.parent / "corpus" / "real")]
    for too_small in (100, 0):  # 0 too: not taken for "no size given"
        with pytest.raises(DatasetError, match="at least 257"):
            prepare(real, tmp_path / "a", vocab_size=too_small, progress=False)
    with pytest.raises(DatasetError, match=r"must be in \[0, 1\)"):
        prepare(real, tmp_path / "a", val_fraction=1.0, progress=False)
    with pytest.raises(DatasetError, match="no document fell into the val split"):
        prepare(
            [real[0] + "/this.py"],
            tmp_path / "a",
            vocab_size=300,
            val_fraction=0.01,
            progress=False,
        )
    with pytest.raises(DatasetError, match="has no '<nope>' token"):
        prepare(
            real,
            tmp_path / "a",
            tokenizer_file=path / "tokenizer.json",
            eos_token="<nope>",
            progress=False,
        )
    assert not (tmp_path / "a").exists()


def test_cli_reports_errors_and_builds(dataset, tmp_path, capsys):
    path, _ = dataset
    assert main(["--input", str(tmp_path / "*.none"), "--output", str(tmp_path / "x")]) == 2
    assert "error: no files matched" in capsys.readouterr().err
    real = str(path.parent / "corpus" / "real")
    args = [
        "--input",
        real,
        "--output",
        str(tmp_path / "x"),
        "--tokenizer",
        str(path / "tokenizer.json"),
        "--val-fraction",
        "0.3",
        "--no-progress",
    ]
    assert main(args) == 0
    assert (
        read_manifest(tmp_path / "x")["tokenizer_sha256"] == read_manifest(path)["tokenizer_sha256"]
    )
    assert main(args) == 0 and "up to date" in capsys.readouterr().err


def test_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN])
    tokenizer.save(str(tmp_path / "big.json"))
    documents = write_corpus(tmp_path / "corpus")
    manifest = prepare(
        corpus_inputs(tmp_path / "corpus"),
        tmp_path / "ds",
        progress=False,
        tokenizer_file=tmp_path / "big.json",
        val_fraction=0.2,
    )
    assert manifest["dtype"] == "uint32" and manifest["eos_id"] > 65535
    samples = read_split(tmp_path / "ds", "train") + read_split(tmp_path / "ds", "val")
    assert all(s.dtype == np.uint32 and s[-1] == manifest["eos_id"] for s in samples)
    decoded = [decode_document(tokenizer, s) for s in samples]
    assert Counter(decoded) == Counter(documents)


def test_default_corpus_is_the_stdlib_sources_in_a_fixed_order():
    files = default_corpus_files()
    assert len(files) > 300
    stdlib = Path(os.path.dirname(os.__file__))
    relative = [f.relative_to(stdlib).as_posix() for f in files]
    assert relative == sorted(relative) and "textwrap.py" in relative
    assert not any(EXCLUDED_DIRS.intersection(r.split("/")[:-1]) for r in relative)
    assert default_corpus_files() == files


def test_sizes_that_cannot_work_are_refused_before_any_work(dataset, tmp_path):
    path, _ = dataset
    real = [str(path.parent / "corpus" / "real")]
    corpus_bytes = sum(f.stat().st_size for f in resolve_inputs(real))
    for huge in (10**9, 10**20):  # a 70 GB allocation; an overflow in the tokenizer
        with pytest.raises(DatasetError, match=rf"--vocab-size {huge:,} is too large"):
            prepare(real, tmp_path / "a", vocab_size=huge, progress=False)
    with pytest.raises(DatasetError, match=f"{corpus_bytes:,} bytes of input give at most"):
        prepare(real, tmp_path / "a", vocab_size=257 + corpus_bytes + 1, progress=False)
    big = tmp_path / "big.txt"  # 2 MiB (sparse): enough bytes for any vocabulary
    with big.open("wb") as f:
        f.truncate(2**21)
    with pytest.raises(DatasetError, match="the maximum is 1,048,576"):
        prepare([str(big)], tmp_path / "a", vocab_size=2**20 + 1, progress=False)
    for bad in ("abc", "0kb", "4gb"):  # MDS offsets are 32-bit
        with pytest.raises(DatasetError, match=f"--shard-size '{bad}' is not a size"):
            prepare(real, tmp_path / "a", vocab_size=300, shard_size=bad, progress=False)
    assert main(["--input", *real, "--output", str(tmp_path / "a"), "--shard-size", "abc"]) == 2
    assert not (tmp_path / "a").exists()


def test_an_output_inside_an_input_is_refused(dataset, tmp_path):
    path, _ = dataset
    corpus = tmp_path / "corpus"
    shutil.copytree(path.parent / "corpus" / "real", corpus)
    with pytest.raises(DatasetError, match="inside the input directory"):
        prepare([str(corpus)], corpus / "ds", vocab_size=300, val_fraction=0.3, progress=False)
    # A glob that did not match the dataset when it was built would read it on a rebuild.
    pattern = str(corpus / "**")
    prepare([str(corpus / "*.py")], corpus / "ds", vocab_size=300, val_fraction=0.3, progress=False)
    with pytest.raises(DatasetError, match=r"is inside --output .*ds: the dataset would read"):
        prepare([pattern], corpus / "ds", vocab_size=300, overwrite=True, progress=False)
    assert read_manifest(corpus / "ds")["input_files"] == len(list(corpus.glob("*.py")))


def test_a_signal_mid_build_leaves_no_partial_directory(tmp_path):
    stdlib = Path(os.__file__).parent
    inputs = [str(stdlib / package / "*.py") for package in ("email", "json", "logging", "asyncio")]
    out = tmp_path / "out"
    build = subprocess.Popen(
        [sys.executable, "-m", "data.prepare", "--input", *inputs, "--output", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")):
        assert build.poll() is None and time.monotonic() < deadline, build.stderr.read()
        time.sleep(0.01)
    build.send_signal(signal.SIGTERM)
    assert build.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_workers_write_the_same_bytes_as_one(dataset, tmp_path, monkeypatch):
    path, _ = dataset
    corpus = path.parent / "corpus"
    options = dict(vocab_size=400, val_fraction=0.2, shard_size="8kb", progress=False)
    monkeypatch.setattr(data.prepare, "ENCODE_BATCH_BYTES", 8 << 10)  # several batches
    batches = []

    class CountingPool(ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            batches.append(args[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(data.prepare, "ProcessPoolExecutor", CountingPool)
    prepare(corpus_inputs(corpus), tmp_path / "one", workers=1, **options)
    assert not batches  # one worker: encoded in this process
    prepare(corpus_inputs(corpus), tmp_path / "two", workers=2, **options)
    assert len(batches) > 4  # and docs.jsonl was read in several chunks:
    assert sum(chunk.source.name == "docs.jsonl" for batch in batches for chunk in batch) > 1
    assert len(read_manifest(tmp_path / "one")["train"]["shard_tokens"]) > 1
    assert dataset_files(tmp_path / "two") == dataset_files(tmp_path / "one")
    assert dataset_files(path) == dataset_files(tmp_path / "one")  # the batch size no matter

    # --workers is not what the dataset is: with others it is up to date.
    stamp = (tmp_path / "one" / "dataset.json").stat().st_mtime_ns
    prepare(corpus_inputs(corpus), tmp_path / "one", workers=3, **options)
    assert (tmp_path / "one" / "dataset.json").stat().st_mtime_ns == stamp


def _write_formats(root: Path, documents: list[str]) -> dict[str, list[str]]:
    """The documents as .jsonl, .jsonl.gz, .jsonl.zst (two frames) and a save_to_disk
    directory, given and found in a directory: --input arguments by name."""
    datasets = pytest.importorskip("datasets")
    root.mkdir()
    lines = "".join(json.dumps({"text": text}) + "\n" for text in documents).encode() + b"\n"
    (root / "docs.jsonl").write_bytes(lines)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    half = len(lines) // 2  # a frame ends mid-line
    frames = zstandard.compress(lines[:half]) + zstandard.compress(lines[half:])
    (root / "docs.jsonl.zst").write_bytes(frames)
    saved = datasets.Dataset.from_dict({"id": list(range(len(documents))), "text": documents})
    saved.save_to_disk(str(root / "holder" / "saved"))
    names = ("docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst", "holder/saved", "holder")
    return {name: [str(root / name)] for name in names}


def test_compressed_and_saved_dataset_inputs_give_the_same_tokens(dataset, tmp_path, monkeypatch):
    path, _ = dataset
    monkeypatch.setattr(data.prepare, "ENCODE_BATCH_BYTES", 8 << 10)  # chunks span lines, frames
    monkeypatch.setattr(data.sources, "TABLE_ROWS", 16)
    documents = [*synthetic_documents(80, seed=3), *TRICKY.values(), "", "multi\nline ✓"]
    inputs = _write_formats(tmp_path / "in", documents)
    options = dict(tokenizer_file=path, val_fraction=0.3, shard_size="8kb", progress=False)
    tokens = {}
    for name, given in inputs.items():
        manifest = prepare(given, tmp_path / name.replace("/", "_"), **options)
        assert manifest["input_files"] == 1, name
        tokens[name] = {s: read_split(tmp_path / name.replace("/", "_"), s) for s in SPLITS}
    reference = tokens.pop("docs.jsonl")
    assert reference["val"] and len(reference["train"]) + len(reference["val"]) == len(documents)
    for name, splits in tokens.items():
        for split in SPLITS:
            assert len(splits[split]) == len(reference[split]), (name, split)
            for got, expected in zip(splits[split], reference[split], strict=True):
                np.testing.assert_array_equal(got, expected)
    decoded = decoded_samples(tmp_path / "holder_saved")
    assert Counter(decoded["train"] + decoded["val"]) == Counter(documents)

    # The fingerprint covers the saved dataset's files: other rows are another dataset.
    datasets = pytest.importorskip("datasets")
    shutil.rmtree(tmp_path / "in" / "holder" / "saved")
    datasets.Dataset.from_dict({"text": documents[1:]}).save_to_disk(inputs["holder/saved"][0])
    with pytest.raises(DatasetError, match="already holds a different dataset"):
        prepare(inputs["holder/saved"], tmp_path / "holder_saved", **options)


def test_saved_dataset_errors_are_clear(dataset, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    path, _ = dataset
    monkeypatch.setattr(data.sources, "TABLE_ROWS", 16)
    options = dict(tokenizer_file=path, val_fraction=0.3, progress=False)
    rows = datasets.Dataset.from_dict({"text": ["a row"] * 17 + [None], "n": list(range(18))})
    rows.save_to_disk(str(tmp_path / "in" / "nulls"))
    with pytest.raises(DatasetError, match=r"nulls row 17: column 'text' is null"):
        prepare([str(tmp_path / "in" / "nulls")], tmp_path / "out", **options)
    with pytest.raises(DatasetError, match=r"nulls has no column 'body' \(columns: text, n\)"):
        prepare([str(tmp_path / "in" / "nulls")], tmp_path / "out", text_field="body", **options)
    with pytest.raises(DatasetError, match="nulls: column 'n' is not a string column"):
        prepare([str(tmp_path / "in" / "nulls")], tmp_path / "out", text_field="n", **options)

    clean = datasets.Dataset.from_dict({"text": synthetic_documents(20, seed=4)})
    splits = datasets.DatasetDict({"train": clean, "test": clean})
    splits.save_to_disk(str(tmp_path / "in" / "splits"))
    message = r"splits is a datasets DatasetDict \(splits: train, test\); pass the directory of "
    for given in (tmp_path / "in" / "splits", tmp_path / "in"):  # given, or found in a walk
        with pytest.raises(DatasetError, match=message + r"the split to read, e\.g\. .*train"):
            prepare([str(given)], tmp_path / "out", **options)
    prepare([str(tmp_path / "in" / "splits" / "test")], tmp_path / "out", **options)

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DatasetError, match=r"needs the datasets package \(pip install datasets\)"):
        prepare([str(tmp_path / "in" / "nulls")], tmp_path / "other", **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_tokenizer_can_be_a_directory_holding_one(dataset, tmp_path, capsys):
    path, _ = dataset
    real = [str(path.parent / "corpus" / "real")]
    options = dict(val_fraction=0.3, progress=False)
    built = prepare(real, tmp_path / "a", tokenizer_file=path, **options)
    assert built["tokenizer_sha256"] == read_manifest(path)["tokenizer_sha256"]
    stamp = (tmp_path / "a" / "dataset.json").stat().st_mtime_ns
    assert prepare(real, tmp_path / "a", tokenizer_file=path / "tokenizer.json", **options) == built
    assert (tmp_path / "a" / "dataset.json").stat().st_mtime_ns == stamp  # the same dataset

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"tokenizer directory .*empty has no tokenizer\.json"):
        prepare(real, tmp_path / "b", tokenizer_file=tmp_path / "empty", **options)
    args = ["--input", *real, "--output", str(tmp_path / "b"), "--tokenizer", str(tmp_path)]
    assert main(args) == 2 and "has no tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bad_workers_is_a_one_line_error(dataset, tmp_path, capsys):
    path, _ = dataset
    real = [str(path.parent / "corpus" / "real")]
    for bad in (0, -2):
        with pytest.raises(DatasetError, match=f"--workers {bad} is not a number of processes"):
            prepare(real, tmp_path / "a", vocab_size=300, workers=bad, progress=False)
    assert main(["--input", *real, "--output", str(tmp_path / "a"), "--workers", "0"]) == 2
    error = "error: --workers 0 is not a number of processes: give 1 or more\n"
    assert capsys.readouterr().err == error
    assert not (tmp_path / "a").exists()


def _special_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    """Inputs that are not files to read: a symbolic link to itself (alone, or met in a
    directory or a glob), a FIFO (opening it would wait for a writer forever) and a device."""
    (root / "loops").mkdir(parents=True)
    (root / "loops" / "ok.txt").write_text("fine")
    (root / "loops" / "self.txt").symlink_to("self.txt")
    (root / "fifos").mkdir()
    (root / "fifos" / "ok.txt").write_text("fine")
    os.mkfifo(root / "fifos" / "pipe.txt")
    (root / "null.txt").symlink_to(os.devnull)
    loop, pipe = root / "loops" / "self.txt", root / "fifos" / "pipe.txt"
    return {
        "loop": ([str(loop)], f"input {loop}: a symbolic link loop"),
        "loop in a directory": ([str(root / "loops")], f"input {loop}: a symbolic link loop"),
        "loop in a glob": ([str(root / "loops" / "*.txt")], f"input {loop}: a symbolic link loop"),
        "fifo": ([str(pipe)], f"input {pipe} is a FIFO, not a file"),
        "fifo in a directory": ([str(root / "fifos")], f"input {pipe} is a FIFO, not a file"),
        "fifo in a glob": ([str(root / "fifos" / "*")], f"input {pipe} is a FIFO, not a file"),
        "device": ([str(root / "null.txt")], f"input {root / 'null.txt'} is a character device"),
    }


@pytest.mark.timeout(300)
def test_links_in_a_loop_fifos_and_devices_are_one_line_errors(tmp_path):
    """Refused by their type, named, before anything opens them: never a traceback or a hang."""
    out = tmp_path / "out"
    for name, (inputs, message) in _special_inputs(tmp_path / "in").items():
        done = subprocess.run(
            [sys.executable, "-m", "data.prepare", "--input", *inputs, "--output", str(out)],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (name, done.stderr[-2000:])
        assert done.stderr.startswith(f"error: {message}"), (name, done.stderr[-2000:])
        assert done.stderr.count("\n") == 1, (name, done.stderr[-2000:])
        assert not out.exists(), name


@pytest.mark.timeout(60)
def test_an_input_that_turns_into_a_fifo_is_refused_when_opened(tmp_path):
    """Checked again where it is opened (without blocking): a file replaced by a FIFO after the
    inputs were listed is refused, not waited on."""
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    with pytest.raises(DatasetError, match=f"input {pipe} is a FIFO, not a file"):
        list(data.sources.read_chunks(pipe, "text", 1 << 20))
    with pytest.raises(DatasetError, match=f"input {pipe} is a FIFO, not a file"):
        data.sources.file_digest([pipe])


def _ready_workers(pid: int) -> list[psutil.Process]:
    """The build's worker processes that are past their start (niced, ignoring SIGINT)."""
    ready = []
    for child in psutil.Process(pid).children():
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            ignored = int(status.split("SigIgn:")[1].split()[0], 16)
            if "spawn_main" in " ".join(child.cmdline()) and ignored & 1 << signal.SIGINT - 1:
                ready.append(child)
        except (OSError, psutil.Error):
            pass  # ended meanwhile
    return ready


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C", "a worker killed"])
def test_a_stop_while_workers_encode_ends_them_and_leaves_nothing(dataset, tmp_path, stop):
    path, _ = dataset
    inputs = [str(f) for f in default_corpus_files()]
    options = ["--output", str(tmp_path / "out"), "--tokenizer", str(path), "--workers", "2"]
    build = subprocess.Popen(
        [sys.executable, "-m", "data.prepare", "--input", *inputs, *options, "--no-progress"],
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # As from a terminal: a shell's background job inherits SIGINT ignored, which would
        # make workers look ready before they are and the build deaf to Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while len(workers := _ready_workers(build.pid)) < 2:
        assert build.poll() is None and time.monotonic() < deadline, build.stderr.read()
        time.sleep(0.01)
    # They yield the CPU to the main process (nice caps at 19).
    niceness = min(19, psutil.Process(build.pid).nice() + WORKER_NICENESS)
    assert [worker.nice() for worker in workers] == [niceness, niceness]
    if stop == "SIGTERM":
        build.send_signal(signal.SIGTERM)
    elif stop == "Ctrl-C":
        os.killpg(build.pid, signal.SIGINT)  # what a terminal sends: the build and its workers
    else:
        workers[0].kill()  # the out-of-memory killer, say
    expected = {"SIGTERM": 128 + signal.SIGTERM, "Ctrl-C": -signal.SIGINT}.get(stop, 2)
    assert build.wait(timeout=60) == expected, build.stderr.read()
    if stop == "a worker killed":
        assert "error: a worker process died" in build.stderr.read()
    assert psutil.wait_procs(workers, timeout=30)[1] == []  # none left running
    assert list(tmp_path.iterdir()) == []
