"""Memory and throughput plan of a training config, before any job is queued.

    python -m launch.plan configs/7b.yaml [key=value ...] [--gpus N] [--device cuda|cpu]
        [--mfu 0.4] [--peak-tflops 989] [--gpu-gib 80]

Everything is per GPU (per rank), in bytes, from the config alone (nothing is built):

- Parameters N: the closed form of `parameter_count`, equal to the model's own count for every
  scheme. Weights take E bytes each (E = 4 for fp32, 2 for bf16/fp16), gradients E (DeepSpeed
  accumulates them in the model's dtype), AdamW's two moments 8, plus 4 for the fp32 master
  weights under bf16/fp16 (in fp32 DeepSpeed updates the weights in place: no copy). ZeRO stage 1
  splits the optimizer states over the W ranks, stage 2 the gradients too, stage 3 the weights
  too; `offload_optimizer` moves optimizer states and gradient partitions to the host,
  `offload_params` the weight partitions. ZeRO's own buffers: the gradient reduce bucket
  (`reduce_bucket_size` elements) and, at stage 3, the gathered weights of the largest module
  plus the prefetch bucket.
- Activations of one micro-batch (data.batch_size x data.seq_len tokens; 1/N of them under
  sequence parallelism N, which also splits attention's heads): the tensors autograd saves,
  counted from the model's code (`layer_saved_bytes`, `model_saved_bytes`: each saved tensor
  once, by storage), plus the backward's largest transient: the recomputed loss chunk's
  [chunk, vocab] float32 tensors (`loss_transient_bytes`), or one attention's backward
  (`attention_backward_bytes`) once its block's MLP half is freed.
  With activation checkpointing a layer keeps its input only, and the backward recomputes one
  layer at a time. CUDA runs the fused RMSNorm, the Triton angle scan and (where it serves the
  scheme) the fused attention; the CPU the composite norm and the blockwise attention.
- Evaluation at each eval length L (README "Long-context evaluation"): eval.batch_tokens // L
  sequences per forward (no grad), run eval.chunk positions at a time (`model.chunked`). Per
  token, the state that spans the sequence: the residual stream, one layer's keys and values
  and its scheme state (`eval_token_bytes`); the whole forward as
  `evaluation.extrapolation.forward_bytes` estimates it (what decides whether a length runs),
  on one GPU and split over a sequence-parallel group of train.sequence_parallel ranks (the
  diagnostics' windows stay whole); the memory per GPU with the training state that stays
  resident (weights, gradients, optimizer states, ZeRO buffers), against --gpu-gib. A length
  fits when its forward is within eval.memory_fraction of what the state leaves (the check
  evaluation makes). The time to evaluate one checkpoint (`eval_seconds`: the forwards of
  perplexity, passkey and the diagnostics' two extra sweeps, windows dealt over the job's
  groups) next to the training time between checkpoints, at the same MFU (the chunked
  attention runs PyTorch matmuls, not the fused kernel: a lower bound).
- FLOPs per token, as the MFU of launch.train counts them (`training.metrics`):
  6 N_matmul + 12 L d T_eff, N_matmul the weights of every linear map (the output head
  included, the embedding not), T_eff the mean number of keys a query attends to at the trained
  length (causal, within `local`'s window). Time per step = FLOPs per token x tokens per GPU per
  step / (MFU x peak FLOP/s).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from evaluation.extrapolation import forward_bytes, plan_lengths, scheme_token_bytes
from kernels.angles import SCAN_CHUNK
from model.config import LEARNED_ROTATIONS, SCHEMES, ModelConfig
from model.transformer import LOSS_CHUNK
from training.config import (
    MAX_PEAK_TFLOPS,
    Config,
    ConfigError,
    load_config,
    sequence_parallel_problems,
    tasks_per_node,
)
from training.engine import precision

H100_BF16_TFLOPS = 989.0  # H100 SXM, dense bf16 (the datasheet's figure without sparsity)
GPU_GIB = 80.0  # the GPU memory evaluation lengths are checked against (H100 80 GB)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# kernels.hybrid.attention.HEAD_DIMS, which cannot be imported on a machine without CUDA once
# Triton is (kernels/hybrid/__init__.py); tests/launch/test_plan.py checks that they agree.
FUSED_HEAD_DIMS = (32, 64, 128)


@dataclass(frozen=True)
class Runtime:
    """How the model runs: activation bytes per element, CUDA or not, the attention path."""

    element: int
    cuda: bool  # fused RMSNorm and the Triton angle scan
    fused: bool  # the fused Triton attention serves the scheme (else blockwise / PaTH)
    packed: bool  # documents packed with boundaries: doc_ids reach every attention


def fused_attention_serves(m: ModelConfig, cuda: bool) -> bool:
    """Whether `kernels.attention` runs the fused kernel for this model (`kernels.fused_serves`):
    on CUDA, no xPos decay, PaTH transport or forget gate, no bias or ALiBi's, a head dim it
    has."""
    spec = SCHEMES[m.scheme]
    if not cuda or spec.decay or spec.transport or spec.forget or spec.bias not in (None, "alibi"):
        return False
    return m.head_dim in FUSED_HEAD_DIMS


def position_parameters(m: ModelConfig) -> int:
    """One layer's parameters of the position scheme (model/schemes.py)."""
    spec, d, H, D = SCHEMES[m.scheme], m.d_model, m.kv_heads, m.head_dim
    count = 0
    if spec.rotation in LEARNED_ROTATIONS:  # the increments' W [H * D/2, d] and its bias
        count += (d + 1) * H * D // 2
    if spec.forget:  # the forget gates' w [HQ, d] and bias
        count += (d + 1) * m.n_heads
    if spec.bias in ("kerple_log", "kerple_power"):  # r1, r2 per query head
        count += 2 * m.n_heads
    if spec.transport:  # w_down, w_up, the short convolution, beta (with bias)
        count += d * m.path_rank + m.path_rank * H * D + H * D * m.path_conv + (d + 1) * H
    return count


def layer_parameters(m: ModelConfig) -> int:
    """One block: q, k, v, o (grouped-query k, v), SwiGLU, two RMSNorms, the position scheme."""
    d, inner, kv = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    return 2 * d * inner + 2 * d * kv + 3 * d * m.hidden_dim + 2 * d + position_parameters(m)


def parameter_count(m: ModelConfig) -> int:
    """Every parameter of `Transformer(m)`: embedding, blocks, final norm, untied head."""
    head = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    return m.vocab_size * m.d_model + m.n_layers * layer_parameters(m) + m.d_model + head


def matmul_parameters(m: ModelConfig) -> int:
    """The weights of every nn.Linear (`training.metrics.training_flops_per_token`'s N)."""
    spec, d, H, D = SCHEMES[m.scheme], m.d_model, m.kv_heads, m.head_dim
    per_layer = layer_parameters(m) - 2 * d - position_parameters(m)
    if spec.rotation in LEARNED_ROTATIONS:
        per_layer += d * H * D // 2
    if spec.forget:
        per_layer += d * m.n_heads
    if spec.transport:
        per_layer += d * m.path_rank + m.path_rank * H * D + d * H
    return m.n_layers * per_layer + m.vocab_size * d


def mean_keys(m: ModelConfig, seq_len: int, train_length: int | None = None) -> float:
    """T_eff: the mean number of keys a query attends to in a sequence of seq_len (causal,
    within `local`'s window, which is the trained length unless model.window names one)."""
    window = (m.window or train_length or seq_len) if SCHEMES[m.scheme].window else None
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """6 N_matmul + 12 L d T_eff (module docstring)."""
    return 6 * matmul_parameters(m) + 12 * m.n_layers * m.d_model * mean_keys(m, seq_len)


def _norm_bytes(m: ModelConfig, rt: Runtime) -> int:
    """Saved per token by an RMSNorm and the layers reading its output: CUDA's fused kernel
    keeps its input and rstd; the CPU's composite its input and normalised rows in float32 and
    the rsqrt; both the output."""
    E, d = rt.element, m.d_model
    if rt.cuda:
        return 2 * E * d + 4
    return 2 * max(E, 4) * d + 4 + E * d


def layer_saved_bytes(m: ModelConfig, rt: Runtime, batch: int, length: int) -> int:
    """Bytes one block saves for the backward on [batch, length] tokens (whole sequences)."""
    spec = SCHEMES[m.scheme]
    E, A = rt.element, max(rt.element, 4)  # angles, scores and tables in at least float32
    d, F, HQ, H, D = m.d_model, m.hidden_dim, m.n_heads, m.kv_heads, m.head_dim
    P, grouped = D // 2, HQ > H
    learned = spec.rotation not in (None, "rope")
    tok = 2 * _norm_bytes(m, rt) + 4 * E * F  # SwiGLU: gate, its silu, up, their product
    tok += E * (HQ + 2 * H) * D  # q, k, v as the attention takes them
    if rt.fused:  # saves q, k, v, angles, output (wo's input too), log-sum-exp, bounds
        tok += E * HQ * D + 4 * HQ + (A * H * P if spec.rotation else 0)
        tok += (8 + 4 * learned) if rt.packed else 0  # starts, ends (and the scan's ends)
    else:
        padded = -(-length // m.attn_block) * m.attn_block / length
        tok += (A * padded if E == A else E) * HQ * D + 4 * HQ * padded  # output, lse
        tok += E * d  # wo's input
        if spec.rotation == "rope":  # cos and sin of q's and k's rotations
            tok += 2 * E * (HQ + H) * P
            if spec.rotate_values:  # v; cos and sin of the output's rotation back
                tok += E * H * D + 2 * E * HQ * P
        elif learned:  # q and k before rotation, cos and sin, the angles (per query head)
            tok += E * (HQ + H) * D + 2 * E * (HQ + H) * P + A * (H + grouped * HQ) * P
            if spec.rotate_values:  # v, its cos and sin; the output rotated back
                tok += E * H * D + 2 * E * H * P + 2 * E * HQ * P + A * (HQ if grouped else H) * P
            if rt.packed and rt.cuda:  # the Triton scan's ends
                tok += 4
            elif rt.packed:  # the CPU scan's gathers: index, mask, float64 offsets, sums
                chunks = -(-length // SCAN_CHUNK) * SCAN_CHUNK / length
                tok += 9 + (8 + A) * H * P * chunks
        if spec.transport:  # low rank, beta, the convolution's terms and masks, w, its norm
            r, width = m.path_rank, m.path_conv
            tok += E * r + 4 * E * H + (width + 2) * E * H * D + width
    if spec.rotation == "scaled":  # the gains' sigmoid
        tok += A * H * P
    if spec.forget:  # the gates' logits and logsigmoid buffer, float64 cumulative gates
        tok += 2 * 4 * HQ + 8 * HQ
    tables = 8 if spec.rotation == "scaled" or spec.forget else 0  # a scalar they share
    if spec.rotation == "scaled":  # theta per key/value head
        tables += A * H * P
    if spec.forget and not spec.transport and m.alibi_skip_eps > 0:
        tables += 8 * batch * HQ  # the reach of each row and head
    if spec.bias is not None and not rt.fused:  # [HQ, T] bias tables, learned ones' graph
        tables += A * HQ * length
        if spec.bias.startswith("kerple"):
            tables += 2 * A * HQ * length + A * length + (spec.bias == "kerple_power") * length
    if spec.bias == "alibi" and not spec.transport and m.alibi_skip_eps > 0:
        tables += 8 * batch * HQ  # the reach of each row and head
    return math.ceil(batch * length * tok) + tables


def model_saved_bytes(m: ModelConfig, rt: Runtime, tokens: int) -> int:
    """Saved outside the blocks: embedding indices, targets, doc_ids (blockwise attention), the
    final norm (whose output the loss chunks keep)."""
    per_token = 16 + (8 if rt.packed and not rt.fused else 0) + _norm_bytes(m, rt)
    return tokens * per_token


def loss_transient_bytes(m: ModelConfig, tokens: int) -> int:
    """The backward of one loss chunk, recomputed: its float32 log-softmax, the gradient into
    it and the logits' gradient, 3 x [chunk, vocab] (the first thing the backward does, while
    every saved activation is alive)."""
    return 3 * 4 * min(LOSS_CHUNK, tokens) * m.vocab_size


def attention_backward_bytes(m: ModelConfig, rt: Runtime, batch: int, length: int) -> int:
    """One attention's backward working set beyond what it saved, with the residual gradient:
    fused, float32 and final dq, dk, dv and the rotated copies; blockwise, float32 blocks of
    q, k, v, dO and their gradients, the sweep's state and two [HQ, block] score tiles per
    query (xPos a decayed copy of q; PaTH its blocked transport, about 2 sqrt(steps) carried
    queries and their adjoint's tiles)."""
    spec, E = SCHEMES[m.scheme], rt.element
    HQ, H, D, block = m.n_heads, m.kv_heads, m.head_dim, m.attn_block
    qkv = (HQ + 2 * H) * D
    if rt.fused:
        tok = E * m.d_model + 4 * HQ + (4 + E) * qkv
        tok += (E * (HQ + H) * D + 4 * H * D // 2) if spec.rotation else 0
        tok += E * (HQ + H) * D if spec.rotate_values else 0
        return batch * length * tok
    steps = -(-length // block)
    tok = E * m.d_model + 4 * (5 * HQ * D + 3 * HQ + 5 * H * D + 2 * HQ * block)
    tok += 2 * block * rt.packed + 4 * HQ * D * spec.decay
    tok += 3 * 4 * HQ * spec.forget  # the gates' float32 offsets, their gradient and its sum
    if spec.transport:
        tok += 4 * (2 * math.isqrt(steps) * HQ * D + (10 * HQ + 6 * H) * block + 6 * (HQ + H) * D)
    return batch * steps * block * tok


def mlp_saved_bytes(m: ModelConfig, rt: Runtime, tokens: int) -> int:
    """What a block's MLP half saves (its norm, SwiGLU, wo's input): freed before its
    attention's backward runs."""
    wo_input = 0 if rt.fused else rt.element * m.d_model  # the fused output is wo's input
    return tokens * (_norm_bytes(m, rt) + 4 * rt.element * m.hidden_dim + wo_input)


def eval_token_bytes(m: ModelConfig, element: int) -> int:
    """Bytes per token of what the chunked evaluation forward holds over the whole sequence:
    the residual stream (d_model), one layer's keys and values (2 x kv_heads x head_dim), both
    of `element` bytes, and the layer's scheme state (`scheme_token_bytes`)."""
    residual_keys_values = element * (m.d_model + 2 * m.kv_heads * m.head_dim)
    return residual_keys_values + scheme_token_bytes(m, element)


def eval_seconds(
    cfg: Config, length: int, groups: int, group_size: int, seconds_per_flop: float
) -> float:
    """Seconds to evaluate one checkpoint at `length` on `groups` groups of `group_size` ranks
    (each window split over a group, windows dealt over the groups): per window, the forward's
    2 N_matmul + 4 L d T_eff FLOPs per token; the windows of perplexity (eval.windows windows
    of the longest length, cut into windows of `length`), of passkey retrieval, and the
    diagnostics' two extra score sweeps (4 L d T_eff per token) on their windows."""
    m, ev = cfg.model, cfg.eval
    lengths, diagnostic, passkey = plan_lengths(cfg, cfg.data.seq_len)
    keys = mean_keys(m, length, cfg.data.seq_len)
    sweep = 4 * m.n_layers * m.d_model * keys  # one pass of scores and values (or 2 of scores)
    forward = length * (2 * matmul_parameters(m) + sweep)
    pieces = lengths[-1] // length
    windows = ev.windows * pieces + (len(ev.passkey_depths) * ev.passkey_trials) * (
        length in passkey
    )
    flops = -(-windows // groups) * forward
    if length in diagnostic and not SCHEMES[m.scheme].transport:
        flops += -(-min(ev.diagnostic_windows, ev.windows) * pieces // groups) * length * sweep
    return flops * seconds_per_flop / group_size


@dataclass(frozen=True)
class EvalPoint:
    length: int
    batch: int  # sequences per forward (before evaluation halves it to fit)
    token_bytes: int  # bytes per token spanning the sequence (`eval_token_bytes`)
    forward: int  # bytes: the forward beyond the weights (evaluation.extrapolation.forward_bytes)
    forward_split: int  # the same per rank of a sequence-parallel group
    memory: int  # per GPU: the resident training state and `forward`
    memory_split: int  # per GPU under sequence parallelism
    seconds: float  # one checkpoint's evaluation at this length, on one rank per window
    seconds_split: float  # the same with each window split over a sequence-parallel group


@dataclass(frozen=True)
class Plan:
    """The plan of one config on `world` ranks; bytes are per GPU (rank) unless named host."""

    cfg: Config
    world: int
    device: str
    precision: str
    fused: bool
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    buffers: int  # ZeRO's reduce bucket and (stage 3) gathered weights
    host: int  # offloaded to the host, per rank
    tokens: int  # tokens of one micro-batch on one rank
    saved: int  # what autograd keeps, without activation checkpointing
    transient: int  # the backward's largest working set beyond `saved`
    saved_checkpointed: int  # with activation checkpointing: each layer's input
    transient_checkpointed: int  # beyond it: a loss chunk, or a layer recomputed and its backward
    evaluation: list[EvalPoint]
    gpu_bytes: int  # the GPU memory evaluation lengths are checked against
    flops_per_token: float
    tokens_per_step: int  # the whole job's
    step_seconds: float
    mfu: float
    peak_tflops: float

    @property
    def activations(self) -> int:
        """The peak of activations as configured (with or without checkpointing)."""
        if self.cfg.train.activation_checkpointing:
            return self.saved_checkpointed + self.transient_checkpointed
        return self.saved + self.transient

    def eval_fits(self, forward: int) -> bool:
        """Whether an evaluation forward of `forward` bytes runs next to the resident training
        state: within eval.memory_fraction of the GPU memory the state leaves (the check
        evaluation makes before each length, `Extrapolation._batch_size`)."""
        resident = self.weights + self.gradients + self.optimizer + self.buffers
        return forward <= self.cfg.eval.memory_fraction * (self.gpu_bytes - resident)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations


def world_size(cfg: Config, gpus: int | None) -> int:
    """Ranks of the job: `gpus`, else the SLURM section's nodes x tasks per node."""
    return gpus if gpus is not None else cfg.slurm.nodes * tasks_per_node(cfg.slurm)


def state_bytes(cfg: Config, parameters: int, world: int, element: int) -> dict[str, int]:
    """Per-GPU weights, gradients, optimizer states and ZeRO buffers, and the host's share."""
    ds, m = cfg.deepspeed, cfg.model
    stage = ds.zero_stage
    share = -(-parameters // world)  # one rank's partition
    weights = element * (share if stage == 3 else parameters)
    gradients = element * (share if stage >= 2 else parameters)
    optimizer = (8 if element == 4 else 12) * share
    host = 0
    if ds.offload_optimizer:
        host += optimizer + element * share
        gradients -= element * share
        optimizer = 0
    if ds.offload_params:
        host += weights
        weights = 0
    buffers = element * ds.reduce_bucket_size
    if stage == 3:
        largest = max(m.vocab_size * m.d_model, m.d_model * max(m.hidden_dim, m.d_model))
        buffers += element * min(largest + ds.prefetch_bucket_size, parameters)
    return dict(
        weights=weights, gradients=gradients, optimizer=optimizer, buffers=buffers, host=host
    )


def plan(
    cfg: Config,
    *,
    gpus: int | None = None,
    device: str = "cuda",
    mfu: float = 0.4,
    peak_tflops: float | None = None,
    gpu_gib: float = GPU_GIB,
) -> Plan:
    """The plan of `cfg` on `gpus` ranks (default: its SLURM job) of `device` (module
    docstring); ConfigError if sequence parallelism does not fit them."""
    world = world_size(cfg, gpus)
    problems = sequence_parallel_problems(cfg, world)
    if problems:
        raise ConfigError(problems[0])
    m, sp = cfg.model, cfg.train.sequence_parallel
    chosen = precision(cfg, torch.device(device))
    cuda, packed = device == "cuda", cfg.data.packing == "boundaries"
    rt = Runtime(ELEMENT_BYTES[chosen], cuda, fused_attention_serves(m, cuda), packed)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    tokens = B * T // sp  # a rank's share; attention's heads are split alike
    layer = layer_saved_bytes(m, rt, B, T) // sp
    outside = model_saved_bytes(m, rt, tokens)
    loss = loss_transient_bytes(m, tokens)
    attention = attention_backward_bytes(m, rt, B, T) // sp - mlp_saved_bytes(m, rt, tokens)
    # Checkpointed blocks keep their input x, and the positions (and doc_ids) all share.
    inputs = tokens * (rt.element * m.d_model * m.n_layers + 8 + 8 * packed)
    parameters = parameter_count(m)
    peak = peak_tflops or cfg.train.peak_tflops or H100_BF16_TFLOPS
    fpt = flops_per_token(m, T)
    states = state_bytes(cfg, parameters, world, rt.element)
    resident = sum(states[key] for key in ("weights", "gradients", "optimizer", "buffers"))
    seconds_per_flop = 1 / (mfu * peak * 1e12)
    _, diagnostic, _ = plan_lengths(cfg, T)
    evaluation = []
    for length in sorted(set(cfg.eval_lengths)):
        batch = max(1, cfg.eval.batch_tokens // length)
        diagnostics = length in diagnostic and not SCHEMES[m.scheme].transport
        chunk = cfg.eval.chunk
        whole = forward_bytes(m, batch, length, diagnostics, rt.element, chunk)
        # Split over a group, but the diagnostics' windows run whole (the probe reads them so).
        split = forward_bytes(m, batch, -(-length // sp), False, rt.element, chunk)
        split = max(split, whole) if diagnostics and sp > 1 else split
        evaluation.append(
            EvalPoint(
                length,
                batch,
                eval_token_bytes(m, rt.element),
                whole,
                split,
                resident + whole,
                resident + split,
                eval_seconds(cfg, length, world, 1, seconds_per_flop),
                eval_seconds(cfg, length, world // sp, sp, seconds_per_flop),
            )
        )
    return Plan(
        cfg=cfg,
        world=world,
        device=device,
        precision=chosen,
        fused=rt.fused,
        parameters=parameters,
        **states,
        tokens=tokens,
        saved=m.n_layers * layer + outside,
        transient=max(loss, attention),
        saved_checkpointed=inputs + outside,
        transient_checkpointed=max(loss, layer + attention),
        evaluation=evaluation,
        gpu_bytes=int(gpu_gib * 2**30),
        flops_per_token=fpt,
        tokens_per_step=tokens * cfg.train.grad_accum * world,
        step_seconds=fpt * tokens * cfg.train.grad_accum / (mfu * peak * 1e12),
        mfu=mfu,
        peak_tflops=peak,
    )


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _row(label: str, *cells: str) -> str:
    return f"  {label:<46}" + "".join(f"{cell:>18}" for cell in cells)


def _eval_row(label: str, *cells: str) -> str:
    return f"  {label:<20}" + "".join(f"{cell:>16}" for cell in cells)


def table(p: Plan) -> str:
    """The plan as a readable table."""
    cfg, m = p.cfg, p.cfg.model
    ds, sp = cfg.deepspeed, cfg.train.sequence_parallel
    offload = [name for name in ("optimizer", "params") if getattr(ds, f"offload_{name}")]
    spec = SCHEMES[m.scheme]
    attention = "fused Triton" if p.fused else "PaTH" if spec.transport else "blockwise"
    master = " + fp32 master" if p.precision != "fp32" else ""
    configured = "with" if cfg.train.activation_checkpointing else "without"
    rows = [
        f"{m.scheme}, {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} query and "
        f"{m.kv_heads} key/value heads, MLP {m.hidden_dim}, vocab {m.vocab_size} "
        f"({'tied' if m.tie_embeddings else 'untied'} head)",
        f"{p.world} {p.device} rank{'s' * (p.world > 1)}: {p.world // sp} data-parallel x "
        f"{sp} sequence-parallel; "
        f"ZeRO-{ds.zero_stage}, {p.precision}, offload {' and '.join(offload) or 'none'}; "
        f"{attention} attention",
        "",
        _row("parameters", f"{p.parameters:,}"),
        _row("  per layer", f"{layer_parameters(m):,}"),
        "",
        "per GPU",
        _row("weights", _size(p.weights)),
        _row("gradients", _size(p.gradients)),
        _row(f"optimizer states (AdamW m, v{master})", _size(p.optimizer)),
        _row("ZeRO buffers (reduce bucket, gathered weights)", _size(p.buffers)),
        _row(
            f"activations, {cfg.data.batch_size} x {cfg.data.seq_len} ({p.tokens:,}/rank)",
            "no checkpointing",
            "checkpointing",
        ),
        _row("  saved for the backward", _size(p.saved), _size(p.saved_checkpointed)),
        _row("  backward transient (largest)", _size(p.transient), _size(p.transient_checkpointed)),
        _row(f"total ({configured} activation checkpointing)", _size(p.total)),
    ]
    if p.host:
        rows.append(_row("offloaded to the host, per rank", _size(p.host)))
    between = cfg.train.checkpoint_every * p.step_seconds
    rows += [
        "",
        f"evaluation of each checkpoint (no grad, eval.chunk = {cfg.eval.chunk} positions at a "
        f"time; eval.batch_tokens = {cfg.eval.batch_tokens:,}); per GPU with the resident "
        f"training state ({_size(p.weights + p.gradients + p.optimizer + p.buffers)}), "
        f"against {_size(p.gpu_bytes)}",
        _eval_row("length", "bytes/token", "memory, 1 GPU", f"memory, SP {sp}", "time", "fits"),
    ]
    for e in p.evaluation:
        fits = "yes" if p.eval_fits(e.forward) else f"SP {sp} only"
        fits = fits if p.eval_fits(e.forward_split) else "no"
        rows.append(
            _eval_row(
                f"{e.length:,} x {e.batch}",
                f"{e.token_bytes:,}",
                _size(e.memory),
                _size(e.memory_split),
                _seconds(e.seconds_split if sp > 1 else e.seconds),
                fits,
            )
        )
    total = sum(e.seconds_split if sp > 1 else e.seconds for e in p.evaluation)
    rows.append(
        _eval_row(
            "one checkpoint",
            "",
            "",
            "",
            _seconds(total),
            f"{total / between:.0%} of training" if between > 0 else "",
        )
    )
    rows.append(
        f"  training between checkpoints (train.checkpoint_every = "
        f"{cfg.train.checkpoint_every} steps): {_seconds(between)}"
    )
    rate = p.tokens_per_step / p.step_seconds
    rows += [
        "",
        _row("FLOPs per token (6 N_matmul + 12 L d T_eff)", f"{p.flops_per_token:.4g}"),
        _row("tokens per step (whole job)", f"{p.tokens_per_step:,}"),
        _row(
            f"time per step at MFU {p.mfu:g} of {p.peak_tflops:g} TFLOP/s", _seconds(p.step_seconds)
        ),
        _row("tokens per second (whole job)", f"{rate:,.0f}"),
    ]
    return "\n".join(rows)


# The ranges of the numeric options: with them every time and rate of the plan is finite and
# positive (MFU x peak FLOP/s is at least 1).
MAX_GPUS = 2**20
MIN_MFU = MIN_PEAK_TFLOPS = 1e-6


class ArgumentError(Exception):
    """A bad command line, reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ArgumentError(message)


def _number(text: str, kind: type, low: float, high: float, what: str) -> float:
    """`text` as a `kind` in [low, high]; argparse.ArgumentTypeError (naming `what`) if not."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _gpus(text: str) -> int:
    return _number(text, int, 1, MAX_GPUS, f"a number of ranks in [1, {MAX_GPUS}]")


def _mfu(text: str) -> float:
    return _number(text, float, MIN_MFU, 1, f"a fraction in [{MIN_MFU:g}, 1], e.g. 0.4")


def _gpu_gib(text: str) -> float:
    return _number(text, float, 1e-3, 2**20, "--gpu-gib")


def _peak_tflops(text: str) -> float:
    what = f"a finite TFLOP/s in [{MIN_PEAK_TFLOPS:g}, {MAX_PEAK_TFLOPS:g}], e.g. 989"
    return _number(text, float, MIN_PEAK_TFLOPS, MAX_PEAK_TFLOPS, what)


def main(argv: list[str]) -> int:
    parser = _Parser(
        prog="python -m launch.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="CONFIG.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as launch.train takes")
    parser.add_argument("--gpus", type=_gpus, help="ranks (default: slurm nodes x tasks per node)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--mfu", type=_mfu, default=0.4, help="model FLOPs utilisation (0.4)")
    parser.add_argument(
        "--gpu-gib",
        type=_gpu_gib,
        default=GPU_GIB,
        help=f"GPU memory the evaluation lengths must fit (default {GPU_GIB:g})",
    )
    parser.add_argument(
        "--peak-tflops",
        type=_peak_tflops,
        help=f"per-GPU peak (default: train.peak_tflops, else {H100_BF16_TFLOPS:g}, H100 bf16)",
    )
    try:
        args = parser.parse_intermixed_args(argv)
    except ArgumentError as e:
        print(f"error: {e} (python -m launch.plan --help)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(
            cfg,
            gpus=args.gpus,
            device=args.device,
            mfu=args.mfu,
            peak_tflops=args.peak_tflops,
            gpu_gib=args.gpu_gib,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.config}: {table(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
