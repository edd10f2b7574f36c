"""The chunked no-grad forward (model/chunked.py) against the plain forward, for every scheme:
per-position losses, perplexity and what the attention probe hands the diagnostics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.diagnostics import attention_statistics
from model import SCHEMES, ModelConfig, Transformer

T, VOCAB = 130, 97


def _model(scheme: str) -> Transformer:
    """Two layers, grouped-query heads (4 query heads on 2 key/value heads), a window shorter
    than T for `local`, weights moved off their RoPE/ALiBi-like initialisation."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        scheme=scheme, vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        attn_block=16, window=40,
    )  # fmt: skip
    model = Transformer(cfg, train_length=48)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of T + 1 tokens; the first packs three documents, the second two."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, T + 1), generator=gen)
    doc_ids = torch.zeros(2, T, dtype=torch.long)
    doc_ids[0, 61:], doc_ids[0, 100:], doc_ids[1, 33:] = 1, 2, 1
    return tokens, doc_ids


def _losses(model: Transformer, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden).double()
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_chunked_forward_equals_the_plain_forward(scheme, text):
    tokens, doc_ids = text
    model = _model(scheme)
    for docs, chunk in ((doc_ids, 32), (None, 1000)):  # chunks not dividing T; one chunk
        with torch.no_grad():
            plain = _losses(model, model(tokens[:, :-1], docs, head=False), tokens)
            hidden = model(tokens[:, :-1], docs, head=False, chunk=chunk)
        chunked = _losses(model, hidden, tokens)
        torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
        assert chunked.mean().exp().item() == pytest.approx(plain.mean().exp().item(), 1e-6)


def _statistics(model: Transformer, run) -> list:
    found = []

    def record(layer, q, k, v, kwargs):
        if not SCHEMES[model.cfg.scheme].transport:
            stats = attention_statistics(q, k, **kwargs)
            found.append((stats.mass, stats.entropy))
        found.append((q, k, v))

    with torch.no_grad(), model.attention_probe(record):
        run()
    return found


@pytest.mark.parametrize("scheme", ["hybrid", "alibi", "fox", "xpos", "local", "path_alibi"])
def test_the_probe_sees_the_plain_forwards_attention_inputs(scheme, text):
    """The diagnostics (mixing window, far mass, entropy) read the probe: the chunked forward
    hands it the same q, k, v and kwargs, so every statistic is the same."""
    tokens, doc_ids = text
    model = _model(scheme)
    plain = _statistics(model, lambda: model(tokens[:, :-1], doc_ids, head=False))
    chunked = _statistics(model, lambda: model(tokens[:, :-1], doc_ids, head=False, chunk=32))
    assert len(plain) == len(chunked) > 0
    for expected, found in zip(plain, chunked, strict=True):
        for a, b in zip(expected, found, strict=True):
            # Layer 1's inputs carry layer 0's float32 rounding: 1e-6 of the largest entry.
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * a.abs().max().item())


def test_bad_chunked_calls_are_refused(text):
    tokens, _ = text
    model = _model("alibi")
    with torch.no_grad(), pytest.raises(ValueError, match="hidden states only"):
        model(tokens, chunk=32)
    with pytest.raises(ValueError, match="no-grad"):
        model(tokens, head=False, chunk=32)
    with torch.no_grad(), pytest.raises(ValueError, match="at least 1 position"):
        model(tokens, head=False, chunk=0)
