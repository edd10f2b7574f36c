"""No forward pass at T = 16384 creates a tensor anywhere near T x T; the chunked evaluation
forward at T = 32768 holds little more than the residual stream and one layer's keys and values,
as `evaluation.extrapolation.forward_bytes` estimates."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels
from evaluation.extrapolation import forward_bytes, head_chunk
from model import ModelConfig, Transformer

T = 16384


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


@pytest.mark.parametrize("scheme", ["hybrid", "path_alibi", "xpos", "local", "sandwich"])
def test_forward_at_16k_has_no_quadratic_tensor(scheme):
    cfg = ModelConfig(scheme=scheme, vocab_size=512, d_model=128, n_layers=1, n_heads=4)
    model = Transformer(cfg, train_length=128)
    tokens = torch.randint(0, 512, (1, T))
    recorder = LargestTensor()
    with torch.no_grad(), recorder:
        logits = model(tokens)
    assert logits.shape == (1, T, 512)
    numel, op = recorder.largest
    assert numel <= T * T // 8, f"{op} made a tensor of {numel} elements"


def _saved_for_backward(model: Transformer, length: int) -> int:
    """Elements autograd keeps for the backward pass of one forward at `length`."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    tokens = torch.randint(0, 512, (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    return saved


@pytest.mark.parametrize("scheme", ["hybrid", "xpos", "local", "kerple_log", "path"])
def test_training_memory_is_linear_in_length(scheme):
    """The blockwise backward recomputes probabilities: doubling T doubles what is saved."""
    cfg = ModelConfig(scheme=scheme, vocab_size=512, d_model=64, n_layers=1, n_heads=4)
    model = Transformer(cfg, train_length=128)
    ratio = _saved_for_backward(model, 2048) / _saved_for_backward(model, 1024)
    assert ratio < 2.1, f"saved-for-backward grew {ratio:.2f}x when T doubled"


def test_path_saves_far_less_than_one_float_per_causal_pair():
    """At T = 4096, PaTH's backward keeps the inputs, output and log-sum-exp, not the steps'
    probabilities: under 1/8 of one float32 per causal pair and head (autograd through the
    sweep kept about 47 bytes per pair and head)."""
    B, T, H, D = 1, 4096, 2, 16
    q, k, v, w = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(4))
    beta = torch.rand(B, T, H, requires_grad=True)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.attention(q, k, v, transport=(w, beta))
    assert saved <= T * (T + 1) // 2 * H * 4 / 8, f"{saved:,} bytes saved"


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the storages that ops made while it was on and that some tensor still
    held: each storage counted once, from its first op output until the last tensor on it is
    freed. Storages of `external` tensors (weights, inputs) are not counted."""

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in external}
        self.holders: dict[int, tuple[int, int]] = {}  # storage -> (bytes, tensors holding it)
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        size, count = self.holders[key]
        if count > 1:
            self.holders[key] = (size, count - 1)
            return
        del self.holders[key]
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self.external or size == 0:
                continue
            if key in self.holders:
                self.holders[key] = (size, self.holders[key][1] + 1)
            else:
                self.holders[key] = (size, 1)
                self.live += size
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


EVAL_T = 32768


def _evaluation_peak(model: Transformer, tokens: torch.Tensor, chunk: int | None):
    """(Peak live bytes, summed loss) of an evaluation's no-grad forward of tokens [1, T + 1]
    as evaluation.extrapolation runs it: the hidden states, then the LM head and the loss over
    `head_chunk` positions at a time."""
    tracker = LiveBytes([*model.parameters(), *model.buffers(), tokens])
    T, total = tokens.shape[1] - 1, 0.0
    with torch.no_grad(), tracker:
        hidden = model(tokens[:, :-1], head=False, chunk=chunk)
        step = head_chunk(model.cfg, 1, chunk)
        for start in range(0, T, step):
            logits = model.lm_head(hidden[:, start : start + step]).float()
            targets = tokens[:, 1 + start : 1 + start + step]
            total += F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        del hidden, logits
    return tracker.peak, total


def test_the_chunked_evaluation_forward_holds_the_residual_stream_and_keys_and_values():
    """d_model 256, 4 query heads on 1 key/value head, ALiBi with steep slopes (its attention
    reaches ~60 tokens, so both paths run in seconds); float32. Single-threaded: on a loaded
    2-core machine each of the chunked path's many small ops waits on the worker threads."""
    cfg = ModelConfig(
        scheme="alibi", vocab_size=256, d_model=256, n_layers=1, n_heads=4, n_kv_heads=1
    )
    torch.manual_seed(0)
    model = Transformer(cfg, train_length=128).eval()
    for block in model.blocks:
        block.attn.position.bias.slopes.fill_(0.5)
    tokens = torch.randint(0, cfg.vocab_size, (1, EVAL_T + 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chunked, chunked_loss = _evaluation_peak(model, tokens, chunk=256)
        plain, plain_loss = _evaluation_peak(model, tokens, chunk=None)
    finally:
        torch.set_num_threads(threads)
    assert chunked_loss == pytest.approx(plain_loss, rel=1e-6)
    residual_keys_values = EVAL_T * (cfg.d_model + 2 * cfg.kv_heads * cfg.head_dim) * 4
    assert residual_keys_values <= chunked <= 1.25 * residual_keys_values, chunked
    assert plain >= 4 * chunked, (plain, chunked)
    estimate = forward_bytes(cfg, 1, EVAL_T, False, 4, chunk=256)
    assert abs(estimate - chunked) <= 0.25 * chunked, (estimate, chunked)
