"""data.prepare: exact round trip of real files, stable split, idempotence, clear errors on bad
input, and never a half-written dataset at the output path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_helpers import build_dataset, corpus_inputs, read_split, write_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from data.default_corpus import EXCLUDED_DIRS, default_corpus_files
from data.manifest import DatasetError, read_manifest
from data.prepare import main, prepare
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
    files = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((path / f).read_bytes() == (again / f).read_bytes() for f in files)

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
    with pytest.raises(DatasetError, match="--shard-size 'abc' is not a size"):
        prepare(real, tmp_path / "a", vocab_size=300, shard_size="abc", progress=False)
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
        cwd=Path(__file__).resolve().parents[1],
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
