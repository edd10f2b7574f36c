"""data.loader: batches are the packed document stream, resumption is exact (1 and 2 ranks,
with and without workers), ranks split every epoch exactly, mixtures follow their proportions,
and the cache and shared-memory traps are handled."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (
    WORDS,
    assert_rows_are_windows,
    build_dataset,
    epoch_rows,
    read_split,
    run_ranks,
    stream_tokens,
)

from data.cache import cache_root
from data.config import DataConfig, StreamConfig
from data.distributed import rank_info
from data.loader import build_train_loader, reshard
from data.manifest import DatasetError, read_manifest
from data.prepare import prepare
from training.metrics import Interval

SHAPE = dict(seq_len=37, batch_size=3, seed=5)  # 111 tokens a batch: ~250 batches an epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory)[0]


@pytest.fixture
def cfg(dataset, tmp_path):
    return DataConfig(path=str(dataset), cache_dir=str(tmp_path / "cache"))


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def stream_of_loader(loader, path: Path, epochs: int = 3, stream: int = 0) -> np.ndarray:
    """The token sequence of one of a loader's logical streams (the test's own concatenation
    of the dataset's documents in the loader's order)."""
    documents = read_split(path, "train")
    orders = [loader.documents.stream_order(e, stream).tolist() for e in range(epochs)]
    return stream_tokens(documents, orders)


@pytest.mark.parametrize("packing", ["boundaries", "concat"])
def test_rows_are_windows_of_the_document_stream_served_in_shuffled_order(cfg, dataset, packing):
    cfg.packing = packing
    eos = read_manifest(dataset)["eos_id"]
    n_docs = read_manifest(dataset)["train"]["documents"]
    documents = read_split(dataset, "train")
    with build_train_loader(cfg, **SHAPE) as loader:
        orders = [loader.epoch_documents(e) for e in range(3)]
        tokens = stream_of_loader(loader, dataset)
        batches = take(loader, 500)  # past the end of epoch 0
    for order in orders:
        assert sorted(order) == list(range(n_docs))  # each epoch: every document once
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])  # shuffled, anew each epoch
    assert_rows_are_windows(batches, tokens, 37)
    rows = np.concatenate([b["rows"].numpy() for b in batches])
    first_epoch = epoch_rows(documents, orders[0], 37)
    assert len(rows) > first_epoch  # rows of epoch 1 follow those of epoch 0
    assert sorted(rows[:first_epoch]) == list(range(first_epoch))  # each row once
    assert sorted(rows[first_epoch:]) != list(rows[first_epoch:])  # in shuffled order
    assert list(rows[:first_epoch]) != sorted(rows[:first_epoch])
    for b in batches:
        assert b["tokens"].shape == b["targets"].shape == (3, 37)
        assert b["tokens"].dtype == b["targets"].dtype == torch.int64
        torch.testing.assert_close(b["targets"][:, :-1], b["tokens"][:, 1:])
        if packing == "concat":
            assert b["doc_ids"] is None
            continue
        # Reference: a new document begins at every EOS; numbering restarts in every row.
        for row, ids in zip(b["tokens"].tolist(), b["doc_ids"].tolist(), strict=True):
            expected_ids, current = [], 0
            for token in row:
                current += token == eos
                expected_ids.append(current)
            assert ids == expected_ids


def test_a_batch_mixes_documents_from_all_over_the_epoch(default_corpus, tmp_path):
    """The tiny config's shape on the default corpus: a batch's 16 rows come from many
    documents, consecutive batches barely overlap, and a long document is spread out."""
    cfg = DataConfig(path=str(default_corpus), cache_dir=str(tmp_path / "cache"))
    with build_train_loader(cfg, seq_len=128, batch_size=16, seed=0) as loader:
        tokens = stream_of_loader(loader, default_corpus, epochs=2)
        order = np.concatenate([loader.documents.stream_order(e, 0) for e in range(2)])
        batches = take(loader, 200)
    assert_rows_are_windows(batches, tokens, 128)
    lengths = [len(d) for d in read_split(default_corpus, "train")]
    bounds = np.cumsum([0] + [lengths[i] for i in order])  # document j: [bounds[j], bounds[j+1])

    def documents_of(batch: dict) -> set[int]:
        """Positions in `order` of the documents of the batch's rows (inputs and targets)."""
        found = set()
        for k in batch["rows"].tolist():
            first = np.searchsorted(bounds, k * 128, side="right") - 1
            last = np.searchsorted(bounds, k * 128 + 128, side="right") - 1
            found.update(range(first, last + 1))
        return found

    per_batch = [documents_of(b) for b in batches]
    assert [len(d) for d in per_batch] == [b["documents"] for b in batches]
    assert np.mean([len(d) for d in per_batch]) >= 12
    assert max(len(a & b) for a, b in itertools.pairwise(per_batch)) <= 4
    # The longest document (hundreds of rows) is spread evenly: one of its rows in every few
    # batches, over the whole run, never a run of batches filled with it.
    longest = max(range(len(order)), key=lambda j: bounds[j + 1] - bounds[j])
    starts_in_longest = [
        int(((np.searchsorted(bounds, b["rows"].numpy() * 128, side="right") - 1) == longest).sum())
        for b in batches
    ]
    holding = np.flatnonzero(starts_in_longest)
    assert max(starts_in_longest) == 1 and len(holding) >= 40
    assert holding[0] < 10 and holding[-1] > 190 and max(np.diff(holding)) <= 10
    # The interval's documents_per_batch metric is the mean of these counts.
    interval = Interval()
    for b in batches:
        interval.add(1.0, True, 0.0, 2048, b["documents"])
    assert interval.summary()["documents_per_batch"] == np.mean([len(d) for d in per_batch])


def test_seed_changes_the_order_and_any_length_is_served(cfg, dataset):
    with build_train_loader(cfg, seq_len=4096, batch_size=2, seed=1) as loader:
        order = loader.epoch_documents(0)
        tokens = stream_of_loader(loader, dataset)
        long = take(loader, 2)
    with build_train_loader(cfg, seq_len=128, batch_size=16, seed=2) as loader:
        assert loader.epoch_documents(0) != order
    assert long[0]["tokens"].shape == (2, 4096)
    assert_rows_are_windows(long, tokens, 4096)


@pytest.mark.parametrize(
    ("packing", "num_workers", "resume_at"),
    [("boundaries", 0, 0), ("boundaries", 0, 180), ("concat", 0, 311), ("boundaries", 2, 181)],
)
def test_resumed_loader_continues_exactly(cfg, packing, num_workers, resume_at):
    cfg.packing, cfg.num_workers = packing, num_workers
    steps = resume_at + 150  # across the end of an epoch
    with build_train_loader(cfg, **SHAPE) as loader:
        batches = take(loader, resume_at)
        state = json.loads(json.dumps(loader.state_dict()))
        batches += take(loader, steps - resume_at)
    with build_train_loader(cfg, **SHAPE) as loader:
        loader.load_state_dict(state)
        resumed = take(loader, steps - resume_at)
        # A state saved before logical streams were named (version 2) resumes alike.
        loader.load_state_dict({**state, "version": 2, "parts": None})
        resumed_v2 = take(loader, 20)
    assert_same_batches(resumed, batches[resume_at:])
    assert_same_batches(resumed_v2, batches[resume_at : resume_at + 20])
    fresh = [[0, 0, 0]] * max(num_workers, 1)
    assert (state["positions"] == fresh) == (resume_at == 0)


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_every_token_is_a_target_once_per_epoch_and_resumption_is_exact(
    dataset, tmp_path, world_size, num_workers
):
    """Ranks split each epoch exactly; over one epoch every token of each logical stream is a
    target exactly once (counted), whatever the ranks and workers; a resume at an arbitrary
    step serves the same batches."""
    documents = read_split(dataset, "train")
    length, rows_per_batch = 29, 4
    args = dict(
        path=str(dataset),
        cache_dir=str(tmp_path / "cache"),
        packing="boundaries",
        num_workers=num_workers,
        seq_len=length,
        batch_size=rows_per_batch,
        seed=3,
        resume_at=137,
        steps=520,  # a whole epoch of every logical stream, and more
    )
    ranks = run_ranks(world_size, args, tmp_path)
    for epoch in (0, 1):
        read = [doc for rank in ranks for doc in rank["epochs"][epoch]]
        assert sorted(read) == list(range(len(documents)))  # disjoint, and whole
    for rank in ranks:
        assert rank["resumed_equal"]
        if world_size > 1:  # the launcher left it out: set by the loader
            assert rank["local_world_size"] == str(world_size)
        streams = len(rank["orders"])
        for s, orders in enumerate(rank["orders"]):
            tokens = stream_tokens(documents, orders)
            # Batch b came from logical stream b mod streams (they serve in turn).
            served = [
                (k, row)
                for b in range(s, len(rank["rows"]), streams)
                for k, row in zip(rank["rows"][b], rank["tokens"][b], strict=True)
            ]
            for k, row in served:
                np.testing.assert_array_equal(row, tokens[k * length : k * length + length + 1])
            first_epoch = epoch_rows(documents, orders[0], length)
            assert len(served) > first_epoch, "the test must cover a whole epoch"
            targets = np.zeros(len(tokens), np.int64)
            for k, _ in served[:first_epoch]:
                targets[k * length + 1 : k * length + length + 1] += 1
            epoch_tokens = sum(len(documents[i]) for i in orders[0])
            assert (targets[1:epoch_tokens] == 1).all()  # each token of the epoch, once
            assert targets.max() == 1 and targets[0] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_job_resumed_on_other_rank_counts_reads_every_document_once(cfg, dataset, num_workers):
    """A 1-rank job goes on on 2 ranks, then 3, then 1 again, with 0 or 2 workers a rank
    (data.loader.reshard; this process plays each rank in turn): over the epoch every document
    is read exactly once, counted token by token, and every row is still its stream's window."""
    documents = read_split(dataset, "train")
    length = SHAPE["seq_len"]
    with build_train_loader(cfg, **SHAPE) as loader:  # one logical stream
        order = loader.epoch_documents(0)
        tokens = stream_of_loader(loader, dataset)
        served = take(loader, 5)
        states = [loader.state_dict()]
    cfg.num_workers = num_workers  # the resumed jobs' ranks have workers, or not
    with build_train_loader(cfg, **SHAPE) as loader:
        for world, batches in ((2, 6), (3, 4), (1, 400)):
            saved = []
            for rank in range(world):
                state = reshard(states, rank, world, num_workers)
                loader.load_state_dict({**state, "rank": 0, "world_size": 1})
                served += take(loader, batches)
                saved.append({**loader.state_dict(), "rank": rank, "world_size": world})
            states = saved
    assert_rows_are_windows(served, tokens, length)
    first_epoch = epoch_rows(documents, order, length)
    rows = [k for batch in served for k in batch["rows"].tolist() if k < first_epoch]
    assert sorted(rows) == list(range(first_epoch))  # every row of the epoch, once
    targets = np.zeros(first_epoch * length + 1, np.int64)
    for k in rows:
        targets[k * length + 1 : k * length + length + 1] += 1
    starts = np.cumsum([0] + [len(documents[i]) for i in order])
    read = [targets[max(a, 1) : b].sum() for a, b in itertools.pairwise(starts)]
    assert read == [len(documents[i]) - (i == order[0]) for i in order]  # each document, once


@pytest.fixture(scope="module")
def second_dataset(dataset, tmp_path_factory):
    """Another corpus, tokenized with the first dataset's tokenizer."""
    root = tmp_path_factory.mktemp("second")
    for i in range(40):
        (root / "corpus" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (root / "corpus" / f"{i}.txt").write_text(f"second corpus document {i} " * (i + 1))
    prepare(
        [str(root / "corpus")],
        root / "dataset",
        tokenizer_file=dataset / "tokenizer.json",
        val_fraction=0.1,
        shard_size="4kb",
        progress=False,
    )
    return root / "dataset"


def test_mixture_follows_proportions_from_remote_streams(dataset, second_dataset, tmp_path):
    first, second = (read_manifest(d)["train"] for d in (dataset, second_dataset))
    cfg = DataConfig(
        path=str(dataset),
        cache_dir=str(tmp_path / "cache"),
        streams=[StreamConfig(str(dataset), 3.0), StreamConfig(str(second_dataset) + "/", 1.0)],
    )
    # Shares of tokens (3/4, 1/4) of an epoch holding both datasets' tokens, in documents.
    total = first["tokens"] + second["tokens"]
    drawn = [
        round(share * total * m["documents"] / m["tokens"])
        for share, m in ((3 / 4, first), (1 / 4, second))
    ]
    before = sorted(p.relative_to(second_dataset) for p in second_dataset.rglob("*"))
    with build_train_loader(cfg, **SHAPE) as loader:
        for epoch in (0, 1):
            order = np.array(loader.epoch_documents(epoch))
            assert len(order) == sum(drawn)
            assert int((order >= first["documents"]).sum()) == drawn[1]
        batches = take(loader, 50)
        first_docs = read_split(dataset, "train")
        second_docs = read_split(second_dataset, "train")
        documents = first_docs + second_docs  # sample ids number the streams in order
        orders = [loader.epoch_documents(e) for e in range(2)]
        state = loader.state_dict()
    assert_rows_are_windows(batches, stream_tokens(documents, orders), 37)
    cfg.streams[1].proportion = 3.0  # another mixture: its position would mean other documents
    with (
        build_train_loader(cfg, **SHAPE) as loader,
        pytest.raises(DatasetError, match="documents_per_epoch: saved"),
    ):
        loader.load_state_dict(state)
    # The streams were read as remotes: copied into the cache, their directories untouched.
    assert sorted(p.relative_to(second_dataset) for p in second_dataset.rglob("*")) == before
    assert list((tmp_path / "cache").rglob("*.mds"))


def test_mixture_proportions_are_shares_of_training_tokens(dataset, tmp_path):
    """Streams of ~20- and ~2000-token documents mixed 0.5/0.5 each give 50 +- 3% of the targets
    of 200 batches (by documents, the short one would give about 1%)."""
    rng = random.Random(0)
    paths, manifests = [], []
    for name, count, words in (("short", 2000, (14, 24)), ("long", 100, (1900, 2100))):
        corpus = tmp_path / name / "docs.jsonl"
        corpus.parent.mkdir()
        lines = (
            json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(*words)))})
            for _ in range(count)
        )
        corpus.write_text("\n".join(lines))
        paths.append(tmp_path / name / "dataset")
        prepare(
            [str(corpus)],
            paths[-1],
            tokenizer_file=dataset / "tokenizer.json",
            val_fraction=0.02,
            progress=False,
        )
        manifests.append(read_manifest(paths[-1])["train"])
    short, long = (m["tokens"] / m["documents"] for m in manifests)
    assert 17 <= short <= 23 and 1800 <= long <= 2200, (short, long)
    cfg = DataConfig(
        path=str(dataset),
        cache_dir=str(tmp_path / "cache"),
        streams=[StreamConfig(str(p), 0.5) for p in paths],
    )
    length, rows = 128, 16
    with build_train_loader(cfg, seq_len=length, batch_size=rows, seed=3) as loader:
        batches = take(loader, 200)
        orders = [loader.epoch_documents(e) for e in range(3)]
    documents = read_split(paths[0], "train") + read_split(paths[1], "train")
    tokens = stream_tokens(documents, orders)
    assert_rows_are_windows(batches, tokens, length)
    from_long = np.concatenate(
        [np.full(len(documents[i]), i >= manifests[0]["documents"]) for o in orders for i in o]
    )
    targets = [k * length + 1 + np.arange(length) for b in batches for k in b["rows"].tolist()]
    share = from_long[np.concatenate(targets)].mean()
    assert abs(share - 0.5) <= 0.03, share


def test_mixture_errors(dataset, tmp_path):
    other = tmp_path / "other"
    (tmp_path / "c").mkdir()
    for i in range(20):
        (tmp_path / "c" / f"{i}.txt").write_text(f"own tokenizer {i}")
    prepare([str(tmp_path / "c")], other, vocab_size=280, val_fraction=0.2, progress=False)
    other_eos = tmp_path / "other_eos"
    tokenizer = dataset / "tokenizer.json"
    prepare(
        [str(tmp_path / "c")],
        other_eos,
        tokenizer_file=tokenizer,
        eos_token="a",
        val_fraction=0.2,
        progress=False,
    )
    bad = [
        ([StreamConfig(str(dataset), 1.0), StreamConfig(str(other), 1.0)], "another tokenizer"),
        ([StreamConfig(str(dataset), 1.0), StreamConfig(str(other_eos), 1.0)], "ends documents"),
        (
            [StreamConfig(str(dataset), 1.0), StreamConfig(str(dataset))],
            "every stream a proportion",
        ),
        ([StreamConfig("")], "path is empty"),
        ([StreamConfig(str(dataset), -1.0)], "must be > 0"),
        ([StreamConfig(str(tmp_path / "nowhere"))], "does not exist.*make data"),
        ([StreamConfig("nosuch://bucket/dataset")], "cannot fetch nosuch://bucket/dataset/dataset"),
    ]
    for streams, message in bad:
        with pytest.raises(DatasetError, match=message):
            build_train_loader(
                DataConfig(path=str(dataset), streams=streams, cache_dir=str(tmp_path / "cache")),
                **SHAPE,
            )


def test_rebuilt_dataset_at_the_same_path_is_never_served_from_a_stale_cache(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    cfg = DataConfig(path=str(copy), cache_dir=str(tmp_path / "cache"))
    with build_train_loader(cfg, **SHAPE) as loader:
        take(loader, 3)
    corpus = tmp_path / "new"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i}.txt").write_text(f"a different dataset, document {i}")
    prepare(
        [str(corpus)],
        copy,
        tokenizer_file=dataset / "tokenizer.json",
        val_fraction=0.2,
        overwrite=True,
        progress=False,
    )
    with build_train_loader(cfg, **SHAPE) as loader:
        tokens = stream_of_loader(loader, copy)
        assert_rows_are_windows(take(loader, 3), tokens, 37)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cache directory per dataset


def test_stale_shared_memory_of_a_killed_job_is_cleaned(dataset, tmp_path):
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import itertools, os, signal, sys
        from data.loader import build_train_loader, reshard
        from data.config import DataConfig
        loader = build_train_loader(DataConfig(path={str(dataset)!r}, cache_dir={str(cache)!r}),
                                    seq_len=16, batch_size=2, seed=0)
        print(loader.documents.dataset._shm_prefix_int, flush=True)
        os.killpg(0, signal.SIGKILL)  # the job dies with its resource tracker: nothing cleans up
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    prefix = int(proc.stdout.split()[-1])
    stale = Path(f"/dev/shm/{prefix:06}_locals")
    assert str(cache) in stale.read_bytes().decode()  # left behind, naming our cache
    # Streaming alone would now fail with "Reused local directory".
    with build_train_loader(DataConfig(path=str(dataset), cache_dir=str(cache)), **SHAPE) as loader:
        assert not stale.exists() or loader.documents.dataset._shm_prefix_int == prefix
        assert len(take(loader, 2)) == 2


def test_concurrent_loaders_on_one_cache_take_separate_slots(cfg):
    with build_train_loader(cfg, **SHAPE) as a, build_train_loader(cfg, **SHAPE) as b:
        assert_same_batches(take(a, 5), take(b, 5))
        slots = {loader.documents.dataset.streams[0].local for loader in (a, b)}
        assert len(slots) == 2


def test_bad_state_and_bad_setups_are_clear_errors(cfg, dataset, tmp_path, monkeypatch):
    with build_train_loader(cfg, **SHAPE) as loader:
        state = loader.state_dict()
    with (
        build_train_loader(cfg, **{**SHAPE, "seed": 6}) as loader,
        pytest.raises(DatasetError, match="seed: saved 5, now 6"),
    ):
        loader.load_state_dict(state)
    with (  # the rows are laid out by their length
        build_train_loader(cfg, **{**SHAPE, "seq_len": 40}) as loader,
        pytest.raises(DatasetError, match="seq_len: saved 37, now 40"),
    ):
        loader.load_state_dict(state)
    with pytest.raises(DatasetError, match=r"does not exist.*make data"):
        build_train_loader(DataConfig(path=str(tmp_path / "missing")), **SHAPE)
    cfg.num_workers = 10_000
    with pytest.raises(DatasetError, match="fewer than ranks x workers"):
        build_train_loader(cfg, **SHAPE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cfg.num_workers = 0
    with pytest.raises(DatasetError, match="MASTER_ADDR and MASTER_PORT not set"):
        build_train_loader(cfg, **SHAPE)


def test_a_corrupted_shard_is_a_clear_error_and_leaves_the_cache(dataset, tmp_path):
    """A shard that fails its checksum is evicted from the cache, so that the repaired dataset
    is read afresh (a cached bad copy would fail every later run)."""
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    for shard in (copy / "train").glob("*.zstd"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    cfg = DataConfig(path=str(copy), cache_dir=str(tmp_path / "cache"))
    with (
        build_train_loader(cfg, **SHAPE) as loader,
        pytest.raises(
            DatasetError, match=r"cannot read shard shard\.\d+\.mds\.zstd .*corrupted"
        ) as err,
    ):
        take(loader, 1)
    assert "cached copy in" in str(err.value) and "is evicted" in str(err.value)
    cached = [p.name for p in (tmp_path / "cache").rglob("shard.*")]
    shutil.rmtree(copy)
    shutil.copytree(dataset, copy)  # repaired
    with build_train_loader(cfg, **SHAPE) as loader:
        repaired = take(loader, 5)
    with build_train_loader(
        DataConfig(path=str(dataset), cache_dir=str(tmp_path / "fresh")), **SHAPE
    ) as loader:
        assert_same_batches(repaired, take(loader, 5))
    assert cached == []


def _cached_split(cache: Path) -> Path:
    [split] = cache.glob("*/slot-0/stream-0/train")
    return split


def test_a_planted_cache_is_evicted_not_trained_on(dataset, tmp_path, tmp_path_factory, caplog):
    """Streaming trusts a cache directory's index.json and shards: another dataset's index and
    shards planted there, or a shard altered in place, are found and evicted before use."""
    cfg = DataConfig(path=str(dataset), cache_dir=str(tmp_path / "cache"))
    with build_train_loader(cfg, **SHAPE) as loader:
        expected = take(loader, 40)
    split = _cached_split(tmp_path / "cache")
    other, _ = build_dataset(tmp_path_factory, name="planted", seed=7, val_fraction=0.5)
    shutil.rmtree(split)
    shutil.copytree(other / "train", split)  # a whole other dataset, index and shards
    with caplog.at_level("WARNING"), build_train_loader(cfg, **SHAPE) as loader:
        assert_same_batches(take(loader, 40), expected)
    assert "another dataset's index" in caplog.text

    # One cached shard altered in place (its index intact): its xxh64 no longer matches.
    raw = sorted(split.glob("shard.*.mds"))[0]
    data = bytearray(raw.read_bytes())
    data[-3] ^= 0x01  # a token of the last document
    raw.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level("WARNING"), build_train_loader(cfg, **SHAPE) as loader:
        assert_same_batches(take(loader, 40), expected)
    assert f"evicted from the cache {split}" in caplog.text and raw.name in caplog.text


def test_the_cache_is_private_to_its_user(dataset, tmp_path, monkeypatch, caplog):
    """The default cache is <tmp>/rotalibi-<uid> (mode 0700); one planted by another user (or
    a link, or opened to others) is not used; a data.cache_dir must be ours alone."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = tmp_path / f"rotalibi-{os.getuid()}"
    assert cache_root(None) == private / "streaming"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    os.rmdir(private / "streaming")
    for plant, problem in [
        (lambda: os.chown(private, 12345, 12345), "belongs to uid 12345"),
        (lambda: private.chmod(0o777), "lets other users in"),
        (lambda: (private.rmdir(), private.symlink_to(tmp_path)), "not a directory"),
    ]:
        plant()
        caplog.clear()
        with caplog.at_level("WARNING"):
            root = cache_root(None)
        assert root.parent != private and root.parent.name.startswith(f"rotalibi-{os.getuid()}-")
        assert problem in caplog.text
        if private.is_symlink():
            break
        os.chown(private, os.getuid(), os.getgid())
        private.chmod(0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 12345, 12345)
    with pytest.raises(DatasetError, match="cannot hold a trusted cache: it belongs to uid 12345"):
        cache_root(str(shared))


def test_other_users_leftovers_do_not_stop_a_run(dataset, tmp_path):
    """As an unprivileged user (forked, setuid nobody): another user's private directory
    name, streaming shared memory and file locks on the node are stepped around."""
    public = Path(tempfile.mkdtemp(prefix="rotalibi-test-", dir="/tmp"))
    try:
        public.chmod(0o1777)  # like /tmp
        data = public / "dataset"
        shutil.copytree(dataset, data)
        for path in [data, *data.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        planted = public / "rotalibi-65534"
        planted.mkdir(mode=0o700)
        os.chown(planted, 12345, 12345)
        prefix = next(p for p in itertools.count() if not Path(f"/dev/shm/{p:06}_locals").exists())
        segments = [Path(f"/dev/shm/{prefix:06}_{name}") for name in ("locals", "barrier")]
        for path in segments:
            path.write_bytes(b"\0" * 64)
            path.chmod(0o600)
            os.chown(path, 12345, 12345)
        with build_train_loader(
            DataConfig(path=str(dataset), cache_dir=str(tmp_path / "c")), **SHAPE
        ) as loader:
            expected = take(loader, 3)  # also imports everything the child needs
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover (the child reports through the pipe)
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                tempfile.tempdir = str(public)
                with build_train_loader(DataConfig(path=str(data)), **SHAPE) as loader:
                    batches = take(loader, 3)
                os.write(
                    write,
                    b"same"
                    if all(
                        torch.equal(a["tokens"], b["tokens"])
                        for a, b in zip(batches, expected, strict=True)
                    )
                    else b"different",
                )
                code = 0
            except BaseException as e:
                os.write(write, repr(e).encode()[:4000])
            finally:
                os._exit(code)
        os.close(write)
        report = os.read(read, 4096).decode()
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and report == "same", report
    finally:
        for path in segments:
            path.unlink(missing_ok=True)
        shutil.rmtree(public)


def test_local_world_size_is_derived_when_the_launcher_omits_it(monkeypatch, caplog):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")  # restored (to unset) after the test
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_SIZE", "4")  # the deepspeed launcher's name for it
    info = rank_info()
    assert (info.local_world_size, info.node, info.local_rank) == (4, 1, 1)
    assert os.environ["LOCAL_WORLD_SIZE"] == "4" and "LOCAL_SIZE" in caplog.text
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE")
    assert rank_info().local_world_size == 8 and "single node" in caplog.text
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(DatasetError, match="multiple of LOCAL_WORLD_SIZE"):
        rank_info()
