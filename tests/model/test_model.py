"""Whole-model properties of every scheme: causality, gradients, packing, initial equivalences."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import float64_model, packed_doc_ids, small_model

from model import SCHEMES, ModelConfig, Transformer
from model.config import SchemeSpec
from model.positions import alibi_slopes

ALL = sorted(SCHEMES)


@pytest.mark.parametrize("scheme", ALL)
def test_causal(scheme):
    """Changing future tokens never changes earlier outputs."""
    model = small_model(scheme)
    tokens = torch.randint(0, 61, (2, 37))
    changed = tokens.clone()
    changed[:, 23:] = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :23], after[:, :23], rtol=0, atol=1e-12)
    assert (before[:, 23:] - after[:, 23:]).abs().max() > 1e-6


@pytest.mark.parametrize("scheme", ALL)
def test_gradients_finite_and_reach_every_parameter(scheme):
    model = small_model(scheme)
    tokens = torch.randint(0, 61, (2, 37))
    model.loss(tokens[:, :-1], tokens[:, 1:], packed_doc_ids()[:, :-1]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("scheme", ALL)
def test_packed_documents_equal_each_document_alone(scheme):
    model = small_model(scheme)
    a, b = torch.randint(0, 61, (1, 19)), torch.randint(0, 61, (1, 14))
    doc_ids = torch.tensor([[0] * 19 + [1] * 14])
    with torch.no_grad():
        packed = model(torch.cat((a, b), dim=1), doc_ids)
        torch.testing.assert_close(packed[:, :19], model(a), rtol=0, atol=1e-10)
        torch.testing.assert_close(packed[:, 19:], model(b), rtol=0, atol=1e-10)


def _fresh(scheme: str, **overrides) -> Transformer:
    return float64_model(
        scheme, **{"vocab_size": 61, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, **overrides}
    )


@pytest.mark.parametrize(
    ("scheme", "reference"),
    [
        ("accrot", "rope"),
        ("accrot_v", SchemeSpec(rotation="rope", rotate_values=True)),
        ("hybrid", "vorope_alibi"),
        ("accrot_alibi", "rope_alibi"),
        ("accrot_scaled", "rope"),
        ("accrot_alibi_scaled", "rope_alibi"),
        ("hybrid_scaled", "vorope_alibi"),
        ("fox", "alibi"),
        ("hybrid_fox", "vorope_alibi"),
        ("path_fox", "path_alibi"),
    ],
)
def test_learned_positions_start_as_their_fixed_counterparts(scheme, reference, monkeypatch):
    """At initialisation learned increments (free or scaled) are theta and forget gates forget
    e^-m per token: the model computes RoPE (with the same value rotation) and ALiBi, whatever
    the document layout."""
    if isinstance(reference, SchemeSpec):
        monkeypatch.setitem(SCHEMES, "reference", reference)
        reference = "reference"
    torch.manual_seed(0)
    model = _fresh(scheme)
    fixed = _fresh(reference)
    missing, unexpected = fixed.load_state_dict(model.state_dict(), strict=False)
    learned = (".position.delta.", ".position.forget.")
    assert not missing and all(any(name in key for name in learned) for key in unexpected)
    tokens = torch.randint(0, 61, (2, 37))
    with torch.no_grad():
        for doc_ids in (None, packed_doc_ids()):
            torch.testing.assert_close(
                model(tokens, doc_ids), fixed(tokens, doc_ids), rtol=0, atol=1e-12
            )


def test_value_rotation_changes_the_output():
    """accrot_v at init is RoPE with rotated values, not plain RoPE: the v rotation matters."""
    torch.manual_seed(0)
    rope, accrot_v = _fresh("rope"), _fresh("accrot_v")
    accrot_v.load_state_dict(rope.state_dict(), strict=False)
    tokens = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        assert (rope(tokens) - accrot_v(tokens)).abs().max() > 1e-6


def test_random_accrot_is_seeded_frozen_and_mode_independent():
    torch.manual_seed(0)
    a = _fresh("random_accrot")
    torch.manual_seed(1)
    b = _fresh("random_accrot")
    c = _fresh("random_accrot", random_accrot_seed=7)
    for layer in range(2):
        wa = a.blocks[layer].attn.position.random_weight
        assert torch.equal(wa, b.blocks[layer].attn.position.random_weight)
        assert not torch.equal(wa, c.blocks[layer].attn.position.random_weight)
        assert not any("random" in name for name, _ in a.named_parameters())
    assert not torch.equal(
        a.blocks[0].attn.position.random_weight, a.blocks[1].attn.position.random_weight
    )
    tokens = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        train_out = a.train()(tokens)
        torch.testing.assert_close(a.eval()(tokens), train_out, rtol=0, atol=0)
    b.load_state_dict(a.state_dict())  # the frozen increments travel with the checkpoint
    assert torch.equal(b.blocks[0].attn.position.random_bias, a.blocks[0].attn.position.random_bias)


def _paper_slopes(n: int) -> list[float]:
    """ALiBi paper: geometric from 2^(-8/n) for a power of two; else the closest power of two's
    slopes, then every other slope of twice that power."""
    if n == 12:
        return [2**-(h) for h in range(1, 9)] + [2 ** -(h / 2) for h in (1, 3, 5, 7)]
    return [2 ** (-8 * h / n) for h in range(1, n + 1)]


@pytest.mark.parametrize("n_heads", [8, 12, 16])
def test_alibi_slopes_follow_the_paper(n_heads):
    assert torch.allclose(
        alibi_slopes(n_heads).double(), torch.tensor(_paper_slopes(n_heads), dtype=torch.float64)
    )


def _bias_table(scheme: str, n_heads: int = 8, length: int = 50) -> torch.Tensor:
    model = _fresh(scheme, n_heads=n_heads, n_kv_heads=None, d_model=64)
    x = torch.zeros(1, length, 64, dtype=torch.float64)
    return model.blocks[0].attn.position(x, torch.arange(length)[None], None)["bias"]


def test_type1_type2_kerple_sandwich_match_their_formulas():
    m = _paper_slopes(8)
    type1, type2 = _bias_table("type1"), _bias_table("type2")
    kerple_power, sandwich = _bias_table("kerple_power"), _bias_table("sandwich")
    alibi = _bias_table("alibi")
    for h in range(8):
        for n in range(50):
            z = math.log(3 + m[h] * n)
            assert type1[h, n].item() == pytest.approx(
                -math.log(1 + m[h] * n), rel=1e-12, abs=1e-12
            )
            assert type2[h, n].item() == pytest.approx(-(z + math.log(z)), rel=1e-12)
            assert alibi[h, n].item() == pytest.approx(-m[h] * n, rel=1e-12, abs=1e-12)
            # KERPLE power starts as ALiBi: r1 = slope, r2 = 1.
            assert kerple_power[h, n].item() == pytest.approx(-m[h] * n, rel=1e-9, abs=1e-12)
            cos_sum = sum(math.cos(n * 10000 ** (-2 * k / 128)) for k in range(64))
            lam = 8 / (8 * (h + 1))
            assert sandwich[h, n].item() == pytest.approx(lam * (cos_sum - 64), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    "scheme", ["rope", "hybrid", "random_accrot", "alibi", "kerple_log", "xpos"]
)
def test_bfloat16_models_keep_angles_distances_and_constants_exact(scheme):
    """bfloat16 holds an angle near 2 pi only to 0.02 rad, and integers only up to 256: angles,
    bias tables and decays stay float32, and casting the model keeps its constants float64."""
    model = Transformer(ModelConfig(scheme=scheme, vocab_size=61, d_model=32), train_length=16)
    position = model.blocks[0].attn.position
    x = torch.randn(1, 300, 32)
    positions = torch.arange(300)[None]
    exact = position(x, positions, None)
    half = position.to(torch.bfloat16)(x.bfloat16(), positions, None)
    for key in ("angles", "bias", "decay"):
        if key in exact:
            assert exact[key].dtype == half[key].dtype == torch.float32, key
            if scheme in ("rope", "alibi", "xpos"):  # the others read bfloat16 inputs or weights
                assert torch.equal(exact[key], half[key]), key


@pytest.mark.parametrize("scheme", ["hybrid", "path_alibi"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(scheme):
    model = small_model(scheme)
    tokens, doc_ids = torch.randint(0, 61, (2, 37)), packed_doc_ids()
    results = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        loss = model.loss(tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
