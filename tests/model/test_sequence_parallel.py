"""Sequence parallelism (model/sequence_parallel.py, DeepSpeed-Ulysses) against the same
computation on one rank holding the whole sequence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

from model import SCHEMES
from model.sequence_parallel import SequenceParallel

WORKER = "tests/helpers/sequence_parallel_worker.py"
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node"]


def test_every_scheme_on_two_ranks_equals_one_rank(tmp_path):
    """Loss and every parameter gradient of one step, each of 2 gloo ranks holding half of
    the tokens (documents crossing the boundary, GQA), equal the whole sequence's on one
    rank within 1e-5 relative, float32, for every scheme."""
    out = tmp_path / "sp.json"
    done = subprocess.run(
        [*TORCHRUN, "2", WORKER, "grads", str(out), *sorted(SCHEMES)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(report) == sorted(SCHEMES)
    for scheme, r in report.items():
        assert r["loss_rel"] <= 1e-5 and r["grad_rel"] <= 1e-5, (scheme, r)


def test_each_rank_saves_half_and_no_logits_of_the_whole_length_exist(tmp_path):
    """One training step of the tiny model at T = 8192 on packed documents: under
    sequence_parallel=2 each rank saves at most 0.6x what one rank holding the sequence saves
    for the backward, and no tensor of T x vocab elements exists in either (the loss makes its
    logits a chunk of positions at a time, in the backward too)."""
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [*TORCHRUN, "2", WORKER, "memory", str(out), "8192"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    parallel, whole = report["parallel"], report["whole"]
    assert parallel["saved_bytes"] <= 0.6 * whole["saved_bytes"], report
    for step in (parallel, whole):
        assert step["largest_numel"] < 8192 * report["vocab_size"], report


def test_heads_are_dealt_in_a_snake_so_steep_and_shallow_slopes_share_each_rank():
    """Every key/value head goes to exactly one rank, 1/N each; with an even number of rounds
    each rank's head indices (ALiBi's slopes fall with them) sum to the same total."""
    for count, size in ((4, 2), (8, 2), (8, 4), (16, 4)):
        dealt = [SequenceParallel(None, size, r).heads(count) for r in range(size)]
        assert sorted(h for heads in dealt for h in heads) == list(range(count))
        assert all(len(heads) == count // size for heads in dealt)
        assert len({sum(heads) for heads in dealt}) == 1, dealt
    assert SequenceParallel(None, 4, 0).head_order(4) is None  # one head a rank: as they are
