"""The extrapolation evaluation on the chunked forward (eval.chunk) against the plain forward
(eval.chunk=null) on a real dataset: perplexity, perplexity beyond the trained length, every
attention diagnostic, passkey retrieval and the rotation drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.extrapolation import Extrapolation
from model import Transformer
from training.config import load_config
from training.distributed import World

ROOT = Path(__file__).resolve().parents[2]
CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SETTINGS = [
    "data.seq_len=32",
    "eval.lengths=[32,64,256]",
    "eval.windows=2",
    "eval.diagnostic_lengths=[32,64,256]",
    "eval.passkey_lengths=[256]",
    "eval.passkey_depths=[0.0,0.5,1.0]",
    "eval.passkey_trials=1",
    "model.n_kv_heads=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(found, expected, where: str) -> None:
    """Equal structures; floats within 1e-6 relative, or one unit of the sixth significant
    digit for the diagnostics, which the results keep to 6 digits."""
    if isinstance(expected, dict):
        assert set(found) == set(expected), where
        for key in expected:
            if key != "seconds":
                _compare(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(found) == len(expected), where
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            _compare(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        rounded = not where.startswith((".ppl", ".ppl_beyond"))
        assert found == pytest.approx(expected, rel=1e-5 if rounded else 1e-6, abs=1e-12), where
    else:
        assert found == expected, where


@pytest.mark.parametrize("scheme", ["hybrid", "fox"])
def test_the_chunked_evaluation_equals_the_plain_one(stdlib_dataset, scheme):
    """Chunks of 24 positions (dividing none of the lengths), grouped-query heads, weights
    moved off their initialisation."""
    runs = []
    for chunk in ("null", "24"):
        cfg = load_config(
            ROOT / "configs" / "tiny.yaml",
            [f"data.path={stdlib_dataset}", f"model.scheme={scheme}", f"eval.chunk={chunk}",
             *SETTINGS],
        )  # fmt: skip
        torch.manual_seed(0)
        model = Transformer(cfg.model, train_length=32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        runs.append(Extrapolation(model.eval(), cfg, CPU, train_length=32).run(step=0))
    plain, chunked = runs
    assert set(plain["mixing_window"]) == {"32", "64", "256"} and plain["passkey"]["256"]
    assert plain["skipped"] == {}
    assert (plain["rotation_drift"] is None) == (scheme == "fox")
    _compare(chunked, plain, "")
