"""A model built under deepspeed.zero.Init, as launch.train builds one on several ZeRO-3 ranks:
no rank ever holds the whole model, and the weights are a full construction's, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess

import torch
from conftest import ROOT
from tiny_runs import TORCHRUN
from zero_init_worker import digest

from model import SCHEMES
from training.config import load_config
from training.engine import build_model

# configs/1b.yaml deepened to 34 layers, with a small vocabulary: 1.62e9 parameters (6.5 GB in
# float32), in layers the size of a real 1B model's.
LARGE = "configs/1b.yaml model.n_layers=34,model.vocab_size=2048,deepspeed.precision=fp32"
SMALL = "configs/tiny.yaml model.n_heads=8,model.n_kv_heads=4,model.d_model=64,model.scheme="


def full_construction(spec: str) -> tuple[dict[str, str], int]:
    """sha256 of every weight and buffer of `spec` built whole on one rank, and its bytes."""
    path, _, overrides = spec.partition(" ")
    model = build_model(load_config(path, overrides.split(",")), 1, torch.device("cpu"))
    found = {name: digest(p.data) for name, p in model.named_parameters()}
    found.update({name: f"{b.dtype}:{digest(b)}" for name, b in model.named_buffers()})
    return found, sum(p.numel() * p.element_size() for p in model.parameters())


def test_zero_init_builds_the_same_weights_without_any_rank_holding_them(tmp_path):
    """Every scheme (small) and a 1.6B model, built on 2 ranks: every weight and float64
    constant equals a full construction's bit for bit, and how far each rank's peak resident
    memory while building the large model (its VmHWM, reset before) rises above its resident
    memory before stays below 0.6x the model's float32 size (a whole model would be 1x)."""
    out = tmp_path / "zero_init.json"
    specs = [SMALL + scheme for scheme in sorted(SCHEMES)] + [LARGE]
    # glibc would keep the freed full tensors of each module's construction as heap it does
    # not return; a fixed mmap threshold makes the resident set the memory actually held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        worker = subprocess.Popen(
            [*TORCHRUN, "2", "tests/helpers/zero_init_worker.py", str(out), *specs],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        expected = {spec: full_construction(spec) for spec in specs}  # meanwhile
        assert worker.wait(timeout=900) == 0, log.read_text()[-3000:]
    report = {entry["config"]: entry for entry in json.loads(out.read_text())}
    for spec in specs:
        assert report[spec]["hashes"] == expected[spec][0], spec
    size = expected[LARGE][1]
    assert size > 1.6e9 * 4
    peaks = report[LARGE]["rss_growth"]  # each rank's half: 0.5x
    assert max(peaks) < 0.6 * size, [f"{p / size:.2f}x" for p in peaks]
