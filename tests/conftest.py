"""Shared helpers: small float64 models of every scheme with non-trivial parameters, a small
prepared dataset for the tests that train, and the default corpus."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_runs import TORCHRUN, tiny_run_args

from model import ModelConfig, Transformer

# Without CUDA the Triton kernels (kernels.hybrid) run in Triton's interpreter, which Triton reads
# when it is first imported: switch it on before any test module imports Triton (DeepSpeed does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, sandwich_dim=8)


@contextmanager
def float64_default():
    """Build modules directly in float64 (no float32 rounding of their initial values)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def float64_model(scheme: str, **overrides) -> Transformer:
    """A freshly initialised float64 model."""
    with float64_default():
        return Transformer(ModelConfig(scheme=scheme, **overrides), train_length=16)


def small_model(scheme: str, *, perturb: float = 0.3, seed: int = 0, **overrides) -> Transformer:
    """A float64 model whose parameters are moved off their initial values, so learned parts
    of the schemes (accumulated-angle projections, KERPLE, PaTH) take effect."""
    torch.manual_seed(seed)
    model = float64_model(scheme, **{**SMALL, "attn_block": 8, "window": 11, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model


def wrapped(x: torch.Tensor) -> torch.Tensor:
    """Angles x mod 2 pi mapped to (-pi, pi]: the error of an angle, whatever its turns."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def near_and_far_pairs(length: int, count: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key positions (i, j): half of the pairs anywhere, half within 64 tokens."""
    i = torch.randint(0, length, (count,))
    half = count // 2
    j = torch.cat(
        (torch.randint(0, length, (half,)), (i[half:] - torch.randint(0, 64, (half,))).clamp(0))
    )
    return i, j


def packed_doc_ids() -> torch.Tensor:
    """Two rows of odd length 37 holding 2 and 3 documents."""
    return torch.tensor([[0] * 20 + [1] * 17, [0] * 5 + [1] * 30 + [2] * 2])


def _run_module(*args: str) -> None:
    """`python -m ARGS...` from the repository root; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="session")
def stdlib_dataset(tmp_path_factory) -> Path:
    """A small prepared dataset of three standard-library packages (no download), built once."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(stdlib / package / "*.py") for package in ("email", "json", "logging")]
    output = tmp_path_factory.mktemp("dataset") / "stdlib"
    build = ["data.prepare", "--input", *inputs, "--output", str(output), "--vocab-size", "512"]
    _run_module(*build, "--val-fraction", "0.2")
    return output


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory) -> Path:
    """The default corpus (`make data`), built once into a temporary directory."""
    output = tmp_path_factory.mktemp("default") / "default"
    _run_module("data.default_corpus", "--output", str(output))
    return output


EVAL_ARGS = [
    "eval.lengths=[64,128,256]",
    "eval.windows=3",  # 3 at 256: ranks get unequal shares, padded with a dummy
    "eval.passkey_lengths=[256]",
    "eval.passkey_depths=[0.0,1.0]",
    "eval.passkey_trials=1",
]


@pytest.fixture(scope="session")
def trained_run(stdlib_dataset, tmp_path_factory) -> Path:
    """The tiny config trained for 4 steps on 2 ranks (ZeRO-3), evaluated at steps 2 and 4.
    Shared: tests that write into a run copy it first."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    args = tiny_run_args(
        run_dir,
        stdlib_dataset,
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.warmup_steps=1",
        *EVAL_ARGS,
    )
    done = subprocess.run(
        [*TORCHRUN, "2", "-m", "launch.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_thread():
    """Torch single-threaded for a module of many small ops (the chunked forward of small
    models): on a loaded 2-core machine each op would wait on the worker threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
