"""The drift of learned rotations from RoPE (evaluation.rotation_drift): exactly 0 at
initialisation, a numpy computation from independently captured layer inputs on a model whose
increments were moved by known amounts, and its place in the extrapolation evaluation's results,
scalars and the ZeRO-3 training run's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EVAL_ARGS, SMALL, float64_model

from evaluation.extrapolation import Extrapolation, scalars
from evaluation.rotation_drift import rotation_drift
from launch import evaluate
from model import Transformer
from model.positions import rope_frequencies
from training.config import load_config
from training.distributed import World

ROOT = Path(__file__).resolve().parents[2]
CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LEARNED = ["accrot", "hybrid", "accrot_scaled", "hybrid_scaled"]
SIZES = {**SMALL, "d_model": 32}  # head_dim 8: 4 pairs; 2 key/value heads (an even median)


def _tokens(model, batch: int = 3, length: int = 19, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, length), generator=gen)


@pytest.mark.parametrize("scheme", LEARNED)
def test_drift_is_exactly_zero_at_initialisation(scheme):
    model = float64_model(scheme, **SIZES)
    drift = rotation_drift(model, [_tokens(model)])
    P = model.cfg.head_dim // 2
    assert drift["static"].shape == drift["spread"].shape == (model.cfg.n_layers, P)
    assert torch.equal(drift["static"], torch.zeros(model.cfg.n_layers, P, dtype=torch.float64))
    assert torch.equal(drift["spread"], torch.zeros(model.cfg.n_layers, P, dtype=torch.float64))
    assert torch.equal(drift["theta"], rope_frequencies(model.cfg.head_dim, model.cfg.rope_base))
    assert drift["tokens"] == 3 * 19


@pytest.mark.parametrize("scheme", ["rope", "random_accrot", "alibi", "path"])
def test_schemes_without_learned_increments_have_no_drift(scheme):
    model = float64_model(scheme, **SIZES)
    assert rotation_drift(model, [_tokens(model)]) is None


def _perturbed(scheme: str, seed: int = 0):
    """A float64 model with every weight moved, then each layer's increments set to known
    values: static parts theta (1 + f) (learned) or logits c (scaled), W a random matrix of
    the pair's scale. Returns the model and, per layer, (f or c [H, P], W [H, P, d_model])."""
    torch.manual_seed(seed)
    model = float64_model(scheme, **SIZES)
    cfg = model.cfg
    H, P = cfg.kv_heads, cfg.head_dim // 2
    theta = rope_frequencies(cfg.head_dim, cfg.rope_base)
    known = []
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for block in model.blocks:
            delta = block.attn.position.delta
            factors = torch.randn(H, P, dtype=torch.float64)
            if scheme.endswith("scaled"):
                weight = 0.3 * torch.randn(H, P, cfg.d_model, dtype=torch.float64)
                delta.bias.copy_(factors.flatten())
            else:
                # Up to hundreds of times theta_p, as in a trained model's low frequencies.
                factors = factors * torch.tensor([0.5, 3.0, 30.0, 300.0])
                weight = 0.3 * theta[:, None] * torch.randn(H, P, cfg.d_model, dtype=theta.dtype)
                delta.bias.copy_((theta * (1 + factors)).flatten())
            delta.weight.copy_(weight.reshape(H * P, cfg.d_model))
            known.append((factors.numpy(), weight.numpy()))
    return model, known


def _layer_inputs(model, tokens: torch.Tensor) -> list[np.ndarray]:
    """Each layer's attention input, from a forward hook on its attn_norm: [N, d_model]."""
    seen: list[np.ndarray] = []
    handles = [
        block.attn_norm.register_forward_hook(
            lambda module, args, out: seen.append(out.detach().reshape(-1, out.shape[-1]).numpy())
        )
        for block in model.blocks
    ]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("scheme", ["hybrid", "accrot", "hybrid_scaled", "accrot_scaled"])
def test_drift_equals_the_hand_computation_of_known_increments(scheme):
    model, known = _perturbed(scheme)
    tokens = _tokens(model, batch=3, length=23)
    inputs = _layer_inputs(model, tokens)
    theta = rope_frequencies(model.cfg.head_dim, model.cfg.rope_base).numpy()
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    # Two batches of unequal size: the moments merge over them.
    drift = rotation_drift(model, [tokens[:1], tokens[1:]])
    assert drift["tokens"] == 3 * 23
    for layer, ((factors, weight), x) in enumerate(zip(known, inputs, strict=True)):
        projected = np.einsum("hpd,nd->nhp", weight, x)  # w_hp . x_t
        if scheme.endswith("scaled"):
            static = theta * 2 * sigmoid(factors)  # theta_p 2 sigmoid(c_hp)
            data = theta * 2 * sigmoid(factors + projected) - static
        else:
            static, data = theta * (1 + factors), projected
        expected_static = np.median(np.abs(static - theta) / theta, axis=0)
        expected_spread = np.median(data.std(axis=0, ddof=0) / theta, axis=0)
        if not scheme.endswith("scaled"):
            np.testing.assert_allclose(expected_static, np.median(np.abs(factors), axis=0))
        np.testing.assert_allclose(drift["static"][layer].numpy(), expected_static, rtol=1e-10)
        np.testing.assert_allclose(drift["spread"][layer].numpy(), expected_spread, rtol=1e-8)
        assert (expected_spread > 0.01).all()  # a real, non-trivial spread


def _config(dataset: Path, *overrides: str):
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"data.path={dataset}",
            "data.seq_len=32",
            "eval.lengths=[32,64]",
            "eval.windows=2",
            "eval.passkey_lengths=[]",
            "eval.diagnostic_lengths=[]",
            *overrides,
        ],
    )


def test_the_evaluation_reports_the_drift_on_the_held_out_text_at_the_trained_length(
    stdlib_dataset,
):
    cfg = _config(stdlib_dataset, "model.scheme=hybrid", "eval.batch_tokens=32")
    torch.manual_seed(0)
    model = Transformer(cfg.model, train_length=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    evaluation = Extrapolation(model.eval(), cfg, CPU, train_length=32)
    results = evaluation.run(step=0)
    found = results["rotation_drift"]
    # The first held-out window of 64 tokens, cut into 2 windows of 32 (one per forward).
    windows = evaluation._windows(evaluation.held_out(), 32)[:2, :-1]
    expected = rotation_drift(model, [windows])
    assert found["length"] == 32 and found["windows"] == 2 and found["std"] == "population"
    assert found["tokens"] == expected["tokens"] == 64
    P = cfg.model.head_dim // 2
    assert len(found["static"]) == cfg.model.n_layers and len(found["static"][0]) == P
    for key in ("static", "spread", "theta"):
        np.testing.assert_allclose(np.array(found[key]), expected[key].numpy(), rtol=1e-5)
    assert max(found["spread"][0]) > 0
    tracked = scalars(results)
    for layer in range(cfg.model.n_layers):
        assert tracked[f"extrap/rotation_static@layer{layer}"] == max(found["static"][layer])
        assert tracked[f"extrap/rotation_spread@layer{layer}"] == max(found["spread"][layer])
    json.dumps(results)

    rope = _config(stdlib_dataset, "model.scheme=rope")
    results = Extrapolation(
        Transformer(rope.model, train_length=32).eval(), rope, CPU, train_length=32
    ).run(step=0)
    assert results["rotation_drift"] is None
    assert "no learned rotation" in results["unavailable"]["rotation_drift"]
    assert not any("rotation" in key for key in scalars(results))


def test_the_zero3_training_runs_evaluation_records_the_drift(trained_run, tmp_path):
    """The tiny hybrid run (2 ranks, ZeRO-3): the drift in eval/step_4.json and metrics.jsonl,
    the same as a standalone evaluation of the consolidated checkpoint."""
    inside = json.loads((trained_run / "eval" / "step_4.json").read_text())
    drift = inside["rotation_drift"]
    assert drift["length"] == 64 and drift["tokens"] == 256  # 1 window of 256, cut into 4
    assert len(drift["static"]) == 2 and len(drift["static"][0]) == 16  # layers x pairs
    assert max(drift["static"][1]) > 0  # 4 training steps moved the increments
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").open()]
    logged = {r["step"]: r for r in records if "extrap/ppl@64" in r}
    assert logged[4]["extrap/rotation_static@layer1"] == max(drift["static"][1])
    assert logged[4]["extrap/rotation_spread@layer0"] == max(drift["spread"][0])

    quick = ["eval.diagnostic_lengths=[]", "eval.passkey_lengths=[]"]
    args = [str(trained_run), "--step", "4", "--out", str(tmp_path), *EVAL_ARGS, *quick]
    assert evaluate.main(args) == 0
    alone = json.loads((tmp_path / "eval" / "step_4.json").read_text())["rotation_drift"]
    assert alone["tokens"] == drift["tokens"]
    for key in ("static", "spread"):
        for a, b in zip(alone[key], drift[key], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
