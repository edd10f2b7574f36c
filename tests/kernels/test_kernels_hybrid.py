"""The Triton kernels of `kernels.hybrid` against the float64 references of `kernels.reference`.

Without CUDA the kernels run in Triton's interpreter (`kernels.hybrid` turns it on before it
defines them), so every float32 test below runs on the CPU in `make test`; with CUDA the same
tests run compiled, plus the bfloat16/float16 tests and the memory test, which need a GPU.
Shapes are small (T of 37 to 301, 16-token tiles in the interpreter) and cross block edges;
the scan's precision test alone runs at T = 131072.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import near_and_far_pairs, packed_doc_ids, small_model, wrapped

import kernels
import kernels.hybrid.attention as fused
from kernels import angles as blockwise_angles
from kernels.hybrid import (
    cu_seqlens_bounds,
    document_bounds,
    fused_attention,
    hybrid_attention,
    scan_angles,
)
from kernels.hybrid.scan import _scan_kernel
from kernels.reference import reference_angles, reference_attention
from model.config import SCHEMES
from model.positions import alibi_slopes, rope_frequencies

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU: compiled kernels, bfloat16/float16 tensor-core paths"
)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error of x against ref."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _doc_ids(cu_seqlens: list[int]) -> torch.Tensor:
    lengths = torch.tensor(cu_seqlens).diff()
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]


def test_kernels_run_compiled_on_cuda_and_in_the_interpreter_otherwise():
    """No silent fallback: without CUDA every kernel object is Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    assert fused.INTERPRETING is not CUDA
    for kernel in (_scan_kernel, fused._fwd.fn, fused._dkdv.fn, fused._rotate_kernel):
        assert isinstance(kernel, InterpretedFunction) == (not CUDA), kernel


# ---------------------------------------------------------------------------------------------
# Document bounds
# ---------------------------------------------------------------------------------------------


def test_document_bounds_from_doc_ids_and_cu_seqlens():
    doc_ids = packed_doc_ids()
    starts, ends = document_bounds(doc_ids)
    for b in range(2):
        for t in range(37):
            same = (doc_ids[b] == doc_ids[b, t]).nonzero().flatten()
            assert (starts[b, t], ends[b, t]) == (same.min(), same.max() + 1)
    cu = [0, 5, 33, 34, 70]
    starts, ends = cu_seqlens_bounds(torch.tensor(cu), 70)
    expected = document_bounds(_doc_ids(cu))
    assert torch.equal(starts, expected[0]) and torch.equal(ends, expected[1])


@pytest.mark.parametrize(
    ("cu_seqlens", "message"),
    [([0, 5, 60], "from 0 to the sequence length 70"), ([0, 5, 5, 70], "strictly increasing")],
)
def test_bad_cu_seqlens_are_refused(cu_seqlens, message):
    with pytest.raises(ValueError, match=message):
        cu_seqlens_bounds(torch.tensor(cu_seqlens), 70)


# ---------------------------------------------------------------------------------------------
# The chunkwise angle scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "doc_ids", "cu_seqlens"])
def test_scan_matches_float64_reference(layout):
    """Odd T over three 128-token chunks, P = 5 (a partial pair block), restarts anywhere."""
    torch.manual_seed(0)
    T = 301
    batch = 1 if layout == "cu_seqlens" else 2
    delta = (torch.randn(batch, T, 3, 5) * 2).to(DEVICE)
    doc_ids = bounds = None
    if layout == "doc_ids":
        doc_ids = torch.tensor([[0] * 64 + [1] * 64 + [2] + [3] * 172, [0] * 7 + [1] * 294])
        bounds = document_bounds(doc_ids.to(DEVICE))
    if layout == "cu_seqlens":
        cu = [0, 63, 64, 65, 128, 200, 301]  # a restart exactly on a chunk edge
        doc_ids = _doc_ids(cu)
        bounds = cu_seqlens_bounds(torch.tensor(cu, device=DEVICE), T)
    phi = scan_angles(delta, *(bounds or (None, None)))
    # In [0, 2 pi]: 2 pi itself only where float32 rounds an angle just below it up.
    assert phi.dtype == torch.float32 and phi.min() >= 0 and phi.max() <= 2 * math.pi
    exact = reference_angles(delta.cpu(), doc_ids)
    assert wrapped(phi.cpu().double() - exact).abs().max() < 1e-6


def test_scan_agrees_with_the_blockwise_angles():
    torch.manual_seed(1)
    delta = torch.rand(2, 200, 2, 16) * math.pi
    doc_ids = torch.tensor([[0] * 90 + [1] * 110, [0] * 200])
    phi = scan_angles(delta.to(DEVICE), *document_bounds(doc_ids.to(DEVICE))).cpu()
    reference = blockwise_angles.accumulate_angles(delta, doc_ids)
    assert wrapped(phi.double() - reference.double()).abs().max() < 2e-5


def test_scan_gradient_is_the_reverse_prefix_sum_within_documents():
    torch.manual_seed(2)
    cu = [0, 50, 51, 128, 130, 171]
    delta = torch.randn(1, 171, 2, 16, dtype=torch.float32)
    upstream = torch.randn(1, 171, 2, 16, dtype=torch.float64)
    leaf = delta.to(DEVICE).requires_grad_()
    phi = scan_angles(leaf, *cu_seqlens_bounds(torch.tensor(cu, device=DEVICE), 171))
    (grad,) = torch.autograd.grad(phi, leaf, upstream.float().to(DEVICE))
    leaf64 = delta.double().requires_grad_()
    (expected,) = torch.autograd.grad(reference_angles(leaf64, _doc_ids(cu)), leaf64, upstream)
    assert _rel(grad.cpu(), expected) < 1e-6


def test_scan_meets_the_precision_contract_at_131072():
    """docs/design.md: relative angles within 1e-4 rad of float64 at T = 131072, with restarts."""
    torch.manual_seed(3)
    T = 131072
    delta = torch.rand(1, T, 1, 4) * math.pi
    exact = delta.double().cumsum(dim=1)
    exact[:, 100_003:] -= exact[:, 100_002]
    doc_ids = (torch.arange(T) >= 100_003).long()[None]
    phi = scan_angles(delta.to(DEVICE), *document_bounds(doc_ids.to(DEVICE))).cpu().double()
    assert wrapped(phi - exact).abs().max() < 1e-6
    i, j = near_and_far_pairs(T)
    relative_error = wrapped((phi[:, i] - phi[:, j]) - (exact[:, i] - exact[:, j]))
    assert relative_error.abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# The fused attention
# ---------------------------------------------------------------------------------------------

PACKED = [0, 5, 33, 34, 70]  # a one-token document, edges off the 16-token tiles


def _inputs(batch: int, length: int, head_dim: int, dtype=torch.float32, seed: int = 0):
    """q [B, T, 4, d], k, v [B, T, 2, d] and increments delta [B, T, 2, d/2] (both signs)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, 4, head_dim, generator=gen)
    k, v = torch.randn(2, batch, length, 2, head_dim, generator=gen)
    delta = torch.randn(batch, length, 2, head_dim // 2, generator=gen) * 1.5
    return [x.to(dtype) for x in (q, k, v)] + [delta]


def _compare(
    batch,
    length,
    head_dim,
    *,
    rotate,
    rotate_values,
    alibi,
    window,
    packed,
    dtype=torch.float32,
    deterministic=False,
    results=None,
):  # packed: the cumulative document lengths of one row, or None
    """Relative RMS errors of hybrid_attention's output and gradients (q, k, v, delta)
    against the float64 reference on the same inputs; the output and gradients are appended
    to `results` when given."""
    q, k, v, delta = _inputs(batch, length, head_dim, dtype)
    slopes = alibi_slopes(4) if alibi else None
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, delta)]
    out = hybrid_attention(
        *leaves[:3],
        leaves[3] if rotate else None,
        None if slopes is None else slopes.to(DEVICE),
        rotate_values=rotate_values,
        window=window,
        cu_seqlens=None if packed is None else torch.tensor(packed, device=DEVICE),
        deterministic=deterministic,
    )
    grads = torch.autograd.grad(out, leaves if rotate else leaves[:3], upstream.to(out))
    if results is not None:
        results.append((out, *grads))

    leaves64 = [x.double().requires_grad_() for x in (q, k, v, delta)]
    doc_ids = None if packed is None else _doc_ids(packed)
    bias = None if slopes is None else -slopes.double()[:, None] * torch.arange(length).double()
    expected = reference_attention(
        *leaves64[:3],
        angles=reference_angles(leaves64[3], doc_ids) if rotate else None,
        rotate_values=rotate_values,
        bias=bias,
        window=window,
        doc_ids=doc_ids,
    )
    grads64 = torch.autograd.grad(expected, leaves64 if rotate else leaves64[:3], upstream)
    errors = {"out": _rel(out.detach().cpu(), expected.detach())}
    for name, grad, grad64 in zip("qkv" + "d" * rotate, grads, grads64, strict=False):
        errors[f"d{name}"] = _rel(grad.cpu(), grad64)
    return errors


@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "no_bias"])
@pytest.mark.parametrize("rotate_values", [True, False], ids=["rot_v", "rot_qk"])
@pytest.mark.parametrize("window", [None, 13], ids=["full", "window13"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed_T70", "batch2_T37"])
def test_float32_matches_float64_reference(packed, window, rotate_values, alibi):
    """Output and gradients of q, k, v, delta within 1e-5 relative RMS: odd T, GQA (4 query
    heads on 2 key/value heads), packed documents or a batch of 2, window, ALiBi."""
    batch, length = (1, 70) if packed else (2, 37)
    errors = _compare(
        batch, length, 32, rotate=True, rotate_values=rotate_values, alibi=alibi,
        window=window, packed=PACKED if packed else None,
    )  # fmt: skip
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("head_dim", [64, 128])
def test_float32_head_dims(head_dim):
    errors = _compare(
        1, 70, head_dim, rotate=True, rotate_values=True, alibi=True, window=29, packed=PACKED
    )
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.skipif(CUDA, reason="on a GPU the autotuner already runs unequal tiles")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_pass"])
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)], ids=["BM32_BN16", "BM16_BN32"])
def test_float32_unequal_query_and_key_tiles(tiles, deterministic, monkeypatch):
    """The GPU tiles differ between queries and keys (e.g. 128 x 64, 32 x 128); the block
    ranges must not mix them up, in the dq pass of the deterministic mode either. The
    interpreter's tiles (autotuned and pinned) are replaced for this test."""
    import triton

    config = triton.Config({"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]})
    for tuner in (fused._fwd, fused._dkdv):
        monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(fused, "_pinned", lambda *args: config.all_kwargs())
    errors = _compare(
        1, 70, 32, rotate=True, rotate_values=True, alibi=True, window=29, packed=PACKED,
        deterministic=deterministic,
    )  # fmt: skip
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("rotate_values", [True, False], ids=["rot_v", "rot_qk"])
def test_deterministic_backward_is_bitwise_repeatable(rotate_values):
    """train.deterministic's path (pinned tiles, dq in its own pass, no atomics): two runs give
    bitwise-identical output and gradients, within 1e-5 of the float64 reference (packed
    documents, GQA, ALiBi, a window). On a GPU this is the check
    that matters: there the atomic path's dq changes in its last bits from run to run."""
    runs = []
    for _ in range(2):
        errors = _compare(
            1, 70, 32, rotate=True, rotate_values=rotate_values, alibi=True, window=29,
            packed=PACKED, deterministic=True, results=runs,
        )  # fmt: skip
        assert max(errors.values()) < 1e-5, errors
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("packed", [True, False], ids=["packed_T70", "batch2_T37"])
def test_float32_without_rotation(packed):
    """delta=None: plain causal attention with ALiBi and a window."""
    batch, length = (1, 70) if packed else (2, 37)
    errors = _compare(
        batch, length, 32, rotate=False, rotate_values=True, alibi=True, window=20,
        packed=PACKED if packed else None,
    )  # fmt: skip
    assert max(errors.values()) < 1e-5, errors


def test_constant_increments_are_rope():
    """delta = theta for every token: the logits see (i - j) theta, RoPE's relative angle."""
    q, k, v, _ = _inputs(2, 37, 32)
    theta = rope_frequencies(32, 10000.0).float()
    delta = theta.expand(2, 37, 2, 16).contiguous()
    out = hybrid_attention(*(x.to(DEVICE) for x in (q, k, v, delta)), rotate_values=False)
    rope = (torch.arange(37).double()[:, None] * theta.double())[None, :, None].expand(2, -1, 2, -1)
    expected = reference_attention(q.double(), k.double(), v.double(), angles=rope)
    assert _rel(out.cpu(), expected) < 1e-5


SERVED = ["nope", "sinusoidal", "rope", "alibi", "local", "accrot", "accrot_v", "random_accrot"]
SERVED += ["hybrid", "rope_alibi", "vorope_alibi", "accrot_alibi", "accrot_scaled"]
SERVED += ["accrot_alibi_scaled", "hybrid_scaled"]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_model_dispatch_runs_the_served_schemes_on_the_fused_kernel(scheme, monkeypatch):
    """With the CPU counted as a fused device, a float32 model of each scheme the kernel serves
    runs it (packed documents, GQA, head dim 32) and matches the float64 model on the blockwise
    path in logits and every parameter gradient; the other schemes never reach it."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return fused_attention(*args, **kwargs)

    reference = small_model(scheme, d_model=128, n_layers=1)
    model = small_model(scheme, d_model=128, n_layers=1).float().to(DEVICE)
    tokens = torch.randint(0, 61, (2, 37))
    doc_ids = packed_doc_ids()
    loss64 = reference.loss(tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1])  # blockwise paths
    monkeypatch.setattr(kernels, "FUSED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr("kernels.hybrid.fused_attention", spy)
    loss = model.loss(*(x.to(DEVICE) for x in (tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1])))
    assert bool(calls) == (scheme in SERVED)
    loss64.backward()
    loss.backward()
    assert abs(loss.item() - loss64.item()) < 1e-5 * loss64.item()
    for (name, p64), p in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert _rel(p.grad.cpu(), p64.grad) < 1e-4, name


def test_the_deterministic_flag_reaches_the_fused_kernel(monkeypatch):
    """train.deterministic: the trainer sets Transformer.deterministic, and every attention
    layer passes it through kernels.attention to the fused kernel."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return fused_attention(*args, **kwargs)

    model = small_model("hybrid", d_model=128, n_layers=2).float()
    monkeypatch.setattr(kernels, "FUSED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr("kernels.hybrid.fused_attention", spy)
    tokens = torch.randint(0, 61, (1, 17))
    for deterministic in (False, True):
        model.deterministic = deterministic
        with torch.no_grad():
            model(tokens)
    assert seen == [False, False, True, True] and model.deterministic


def test_fused_serves_only_what_it_computes(monkeypatch):
    monkeypatch.setattr(kernels, "FUSED_DEVICES", ("cuda", "cpu"))
    q, k, v, _ = _inputs(1, 8, 32)
    alibi = kernels.AlibiTable.wrap(-alibi_slopes(4)[:, None] * torch.arange(8.0), alibi_slopes(4))
    assert kernels.fused_serves(q, k, v) and kernels.fused_serves(q, k, v, bias=alibi)
    assert not kernels.fused_serves(q, k, v, bias=alibi.clone())  # a plain table
    assert not kernels.fused_serves(q, k, v, decay=torch.zeros(16))
    assert not kernels.fused_serves(q.double(), k.double(), v.double())
    assert not kernels.fused_serves(*(x[..., :16] for x in (q, k, v)))
    monkeypatch.setattr(kernels, "FUSED_DEVICES", ("cuda",))
    assert not kernels.fused_serves(q.cpu(), k.cpu(), v.cpu())


def test_bad_inputs_are_refused_with_the_problem_named():
    q, k, v, delta = _inputs(2, 8, 32)
    with pytest.raises(ValueError, match="head dim 16"):
        hybrid_attention(q[..., :16], k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="share one dtype"):
        hybrid_attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"delta must be \[B, T, H, d/2\]"):
        hybrid_attention(q, k, v, delta[:, :, :1])
    with pytest.raises(ValueError, match=r"alibi_slopes must be \[HQ\]"):
        hybrid_attention(q, k, v, delta, torch.ones(3))
    with pytest.raises(ValueError, match="window must be a positive"):
        hybrid_attention(q, k, v, delta, window=0)
    with pytest.raises(ValueError, match="B = 1"):
        hybrid_attention(q, k, v, delta, cu_seqlens=torch.tensor([0, 4, 8]))


@pytest.mark.skipif(CUDA, reason="with a GPU this would run the whole benchmark")
def test_benchmark_without_cuda_stops_with_a_clear_message():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "bench.attention"], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "make bench-attention" in done.stderr


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("window", [None, 97])
@pytest.mark.parametrize("rotate_values", [True, False])
def test_half_precision_matches_float64_reference(dtype, head_dim, window, rotate_values):
    """The tensor-core paths at the production tiles: T = 333, packed, GQA, ALiBi."""
    errors = _compare(
        1, 333, head_dim, rotate=True, rotate_values=rotate_values, alibi=True, window=window,
        packed=[0, 100, 101, 250, 333], dtype=dtype,
    )  # fmt: skip
    assert errors["out"] < 5e-3, errors
    assert max(errors.values()) < 1e-2, errors


@needs_cuda
def test_training_memory_is_linear_in_length():
    def peak(length: int) -> int:
        """Peak bytes of forward + backward beyond the inputs (after a first call that lets
        the autotuner pick its tiles: its benchmarking allocates a cache-flush buffer)."""
        q, k, v, delta = (x.cuda() for x in _inputs(1, length, 128, torch.bfloat16))
        leaves = [x.requires_grad_() for x in (q, k, v, delta)]
        slopes = alibi_slopes(4).cuda()
        hybrid_attention(*leaves, slopes).sum().backward()  # tunes the tiles for this length
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        hybrid_attention(*leaves, slopes).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    assert peak(16384) / peak(8192) < 2.2
