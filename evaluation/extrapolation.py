"""Extrapolation evaluation of one model: perplexity by length, attention diagnostics, passkey.

At every evaluation length L (`eval.lengths`; L_train = data.seq_len, the trained length):
- perplexity on held-out text, over all positions, and over the positions t >= L_train only
  (`ppl_beyond`: each predicted from more than L_train tokens). The text is `eval.windows`
  windows of the val split at the longest length (`data.validation`, drawn with `eval.seed`),
  cut into consecutive windows of L at every shorter length: every length, checkpoint and
  scheme predicts the same tokens, so the curves differ by the context length alone;
- on the text of the first `eval.diagnostic_windows` windows, per layer and query head
  (`kernels.diagnostics`, blockwise): the attention mass by distance, averaged over queries; the
  mixing window w(eps), the fewest nearest keys holding 1 - eps of that mass; the far mass, the
  mean mass beyond distance L_train of the queries that have keys that far; the mean entropy;
- passkey retrieval accuracy at each depth (`evaluation.passkey`);
- for schemes with a distance bias, its theoretical receptive field (`model.receptive_field`);
- once, for schemes with learned rotations, how far they have drifted from RoPE
  (`evaluation.rotation_drift`: per layer and pair, the median over key/value heads of the
  static part's and of the data-dependent part's departure relative to theta_p) on the text of
  the first `eval.diagnostic_windows` windows cut at the trained length.

The forward runs `eval.chunk` positions at a time (`model.chunked`): it holds the residual
stream and one layer's keys and values, and the LM head and the loss run over chunks of
positions as well (`head_chunk`); the rotation drift, at the trained length, reads each
attention layer's input from the plain forward. A length whose estimated memory
(`forward_bytes`) does not fit, or that runs out of memory, is skipped and the reason recorded.
With several ranks every rank runs `Extrapolation.run` on its share of the windows and makes
the same forward passes (ZeRO-3 gathers the weights inside them); the sums are all-reduced, so
every rank ends with the same results.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import psutil
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from data.manifest import read_manifest
from data.tokenizer import load_tokenizer
from data.validation import validation_windows
from evaluation.passkey import passkey_key, passkey_prompt
from evaluation.rotation_drift import drift_scalars, has_learned_rotations, rotation_drift
from kernels import AlibiTable
from kernels.alibi_reach import visited_fraction
from kernels.diagnostics import PATH_UNSUPPORTED, attention_statistics
from model import SCHEMES, ModelConfig, Transformer
from model.receptive_field import converges, log_terms, receptive_field, receptive_field_limit
from model.sequence_parallel import SequenceParallel
from training.config import Config, ConfigError
from training.distributed import World

log = logging.getLogger("rotalibi")

HEAD_ELEMENTS = 2**24  # logits computed at once: [batch, positions, vocab] elements
DRIFT_HOST_BYTES = 2**30  # the layer inputs the rotation drift holds on the host at once

Gathered = Callable[[list[torch.nn.Parameter]], AbstractContextManager]


class SkipLength(Exception):
    """This length cannot run; the message says why."""


def head_chunk(cfg: ModelConfig, batch: int, chunk: int | None) -> int:
    """Positions whose float32 logits the evaluation makes at once: HEAD_ELEMENTS elements of
    [batch, positions, vocab], and at most `chunk` positions under the chunked forward."""
    positions = max(1, HEAD_ELEMENTS // (batch * cfg.vocab_size))
    return positions if chunk is None else min(positions, chunk)


def scheme_token_bytes(cfg: ModelConfig, element: int) -> int:
    """Bytes per token of a layer's full-length scheme state at its largest, while
    `PositionScheme.plan` makes it: angles (and their float64 scan or RoPE's float64 angles),
    a bias table (not ALiBi's), the forget gates' float64 sums, PaTH's Householder vectors."""
    spec, H, HQ, P = SCHEMES[cfg.scheme], cfg.kv_heads, cfg.n_heads, cfg.head_dim // 2
    need = 0
    if spec.rotation == "rope":
        need += 4 * 2 * H * P + 8 * P  # float64 t theta, the angles expanded over heads
    elif spec.rotation is not None:
        need += 4 * 8 * H * P  # increments, padded, chunk sums, float64 offsets (2), angles
    if spec.bias not in (None, "alibi"):  # ALiBi's bias comes from its slopes, tile by tile
        need += 4 * 3 * HQ + (4 * cfg.sandwich_dim if spec.bias == "sandwich" else 0)
    if spec.forget:
        need += 4 * 2 * HQ + 8 * 2 * HQ  # logits, log f, float64 copy and sums
    if spec.transport:
        need += element * 6 * H * cfg.head_dim  # projections, convolution terms, w
    return need


def forward_bytes(
    cfg: ModelConfig,
    batch: int,
    length: int,
    diagnostics: bool,
    element: int = 4,
    chunk: int | None = None,
) -> int:
    """A generous estimate of the peak memory of one no-grad forward of [batch, length] tokens
    beyond the weights, with activations of `element` bytes, and of the LM head's chunks.

    chunk None (the plain forward): the residual stream, the larger of a block's attention
    (projections, rotations, the blockwise sweep's float32 copies, state and per-step tensors,
    O(length x block)) and MLP activations, one chunk of LM-head logits.
    With `chunk` (`model.chunked`): the residual stream, one layer's keys and values and its
    scheme state (`scheme_token_bytes`), plus the largest of one chunk's attention (float32
    scores of `chunk` queries x `chunk` keys, queries, accumulators, a tile of keys and values),
    its MLP and its LM-head logits.
    Diagnostics add their accumulators and sweeps (and, chunked, the layer's whole queries)."""
    block, width, heads, kv = min(cfg.attn_block, length), cfg.d_model, cfg.n_heads, cfg.kv_heads
    head = 3 * 4 * min(head_chunk(cfg, batch, chunk), length) * batch * cfg.vocab_size
    mlp = element * (4 * cfg.hidden_dim + 4 * width)
    sweep = 4 * 8 * heads * block
    if chunk is None:
        attention = element * 10 * width + 4 * 6 * width + sweep + 12 * block
        need = batch * length * (2 * element * width + max(attention, mlp)) + head
    else:
        C, D = min(chunk, length), cfg.head_dim
        keys = element * 2 * kv * D
        full = element * width + keys + scheme_token_bytes(cfg, element)
        scores = 4 * heads * C * (5 if SCHEMES[cfg.scheme].forget else 3) * C
        per_query = element * (2 * width + 4 * heads * D) + 4 * (2 * width + 4 * heads * D)
        attention = scores + C * (per_query + 4 * 3 * kv * D)
        need = batch * length * full + max(batch * attention, batch * C * mlp, head)
    if diagnostics:
        need += 8 * heads * length * (cfg.n_layers + 2 * block)
        if chunk is not None:  # the layer's queries, and the statistics' sweep over them
            need += batch * length * (element * width + 4 * 3 * width + sweep)
    return need


def gathered_bytes(model: Transformer) -> int:
    """What ZeRO-3 may hold gathered at once during a forward: two blocks' weights (the one
    running and the one prefetched) and the embedding (the LM head's chunks)."""
    size = lambda p: getattr(p, "ds_numel", p.numel()) * p.element_size()  # noqa: E731
    return 2 * sum(size(p) for p in model.blocks[0].parameters()) + size(model.embed.weight)


def free_bytes(device: torch.device) -> int:
    """Memory this process can still take: free plus cached device memory on CUDA; on the
    CPU, the available RAM shared by this node's ranks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in text


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _rounded(x: Tensor | float) -> list | float:
    """Nested lists of floats with 6 significant digits, for JSON."""
    if isinstance(x, Tensor):
        return [_rounded(v) for v in x] if x.dim() else _rounded(x.item())
    return float(f"{x:.6g}")


def skipping_visits(q: Tensor, k: Tensor, kwargs: dict) -> float | None:
    """The fraction of the causal key blocks (of the attention's `block`) that skipping visits
    for these inputs (`kernels.alibi_reach.visited_fraction`): what skipping buys. None where
    nothing is skipped: no ALiBi bias, model.alibi_skip_eps = 0, xPos decay or PaTH."""
    bias, eps = kwargs.get("bias"), kwargs.get("skip_eps", 0.0)
    if not isinstance(bias, AlibiTable) or not eps or kwargs.get("decay") is not None:
        return None
    if kwargs.get("transport") is not None or kwargs.get("gate") is not None:
        return None
    return float(
        visited_fraction(
            q, k, bias.slopes, eps=eps, scale=kwargs.get("scale"),
            doc_ids=kwargs.get("doc_ids"), block=kwargs.get("block", 64),
        )
    )  # fmt: skip


def _rows(kwargs: dict, rows: Tensor) -> dict:
    """Attention kwargs restricted to batch rows (the entries with a batch dimension)."""
    out = dict(kwargs)
    for key in ("angles", "doc_ids", "gate"):
        if out.get(key) is not None:
            out[key] = out[key][rows]
    return out


def plan_lengths(cfg: Config, train_length: int) -> tuple[list[int], list[int], list[int]]:
    """The evaluation lengths, and those of them with diagnostics and with passkey retrieval
    (by default the lengths up to 16 x train_length). ConfigError for a stray length."""
    lengths = sorted(set(cfg.eval_lengths))
    subsets = []
    for key in ("diagnostic_lengths", "passkey_lengths"):
        chosen = getattr(cfg.eval, key)
        if chosen is None:
            chosen = [n for n in lengths if n <= 16 * train_length]
        stray = sorted(set(chosen) - set(lengths))
        if stray:
            raise ConfigError(
                f"'eval.{key}' has {stray}, which are not evaluation lengths {lengths}; "
                "add them to eval.lengths or drop them"
            )
        subsets.append(sorted(set(chosen)))
    return lengths, *subsets


class Extrapolation:
    """The evaluation of one model (module docstring). `forward(tokens, chunk)` returns the
    final hidden states (default: the model's own forward with head=False), `chunk` positions
    at a time (`model.chunked`; eval.chunk) or all at once (None: the rotation drift, which
    reads each attention layer's input); `gathered(params)` makes ZeRO-3 partitioned parameters
    whole inside a `with` (default: nothing to gather). With `sequence_parallel` (this rank's
    group of the job's consecutive groups, `training.distributed.sequence_parallel_group`) each
    window of perplexity and passkey is split over a group (the model's Ulysses path), windows
    dealt over the groups; the diagnostics' windows, which the probe reads whole, over ranks."""

    def __init__(
        self,
        model: Transformer,
        cfg: Config,
        world: World,
        *,
        train_length: int,
        forward: Callable[[Tensor, int | None], Tensor] | None = None,
        gathered: Gathered | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ):
        self.model, self.cfg, self.world, self.train_length = model, cfg, world, train_length
        self.forward = forward or (lambda tokens, chunk: model(tokens, head=False, chunk=chunk))
        self.gathered = gathered or (lambda params: nullcontext())
        self.device = world.device
        self.sp = sequence_parallel
        size = 1 if sequence_parallel is None else sequence_parallel.size
        self.group, self.groups = world.rank // size, world.world_size // size
        self.scheme = model.cfg.scheme
        self.diagnosable = not SCHEMES[self.scheme].transport
        self.lengths, self.diagnostic_lengths, self.passkey_lengths = plan_lengths(
            cfg, train_length
        )

    # ------------------------------------------------------------------ collectives

    def _sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum over ranks (a collective when there are several)."""
        if self.world.world_size > 1:
            tensor = tensor.to(self.device)
            torch.distributed.all_reduce(tensor)
        return tensor.cpu()

    def _min(self, value: float) -> float:
        if self.world.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return tensor.item()

    def _shares(self, count: int, batch: int, split: bool = False) -> Iterator[list[int]]:
        """This rank's items (every world_size-th of `count`; `split`: its sequence-parallel
        group's, every groups-th) in batches, padded with -1 so that every rank runs the same
        number of equally shaped batches."""
        rank, size = self.world.rank, self.world.world_size
        if split:
            rank, size = self.group, self.groups
        mine = list(range(rank, count, size))
        mine += [-1] * (-(-count // size) - len(mine))
        for start in range(0, len(mine), batch):
            yield mine[start : start + batch]

    # ------------------------------------------------------------------ the pieces

    def _hidden(self, tokens: Tensor, probe=None) -> Tensor:
        context = self.model.attention_probe(probe) if probe is not None else nullcontext()
        with context:
            return self.forward(tokens.to(self.device), self.cfg.eval.chunk)

    @contextmanager
    def _split(self) -> Iterator[None]:
        """Within the block the model runs each sequence over this rank's group."""
        saved = self.model.sequence_parallel
        self.model.sequence_parallel = self.sp
        try:
            yield
        finally:
            self.model.sequence_parallel = saved

    def _split_hidden(self, tokens: Tensor) -> tuple[Tensor, int]:
        """(This rank's slice of the hidden states of tokens [B, T] run over its sequence-
        parallel group, the position of its first row). T is padded at the end to a multiple
        of the group's size (causal: the padding changes no earlier position)."""
        if self.sp is None:
            return self._hidden(tokens), 0
        pad = -tokens.shape[1] % self.sp.size
        with self._split():
            hidden = self._hidden(F.pad(tokens, (0, pad)))
        return hidden, self.sp.rank * hidden.shape[1]

    def _head(self, hidden: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(start, float32 logits) of the LM head over chunks of positions."""
        weight = self.model.lm_head.weight
        B, T, _ = hidden.shape
        chunk = head_chunk(self.model.cfg, B, self.cfg.eval.chunk)
        with self.gathered([weight]):
            for start in range(0, T, chunk):
                yield start, F.linear(hidden[:, start : start + chunk], weight).float()

    def _batch_size(
        self,
        length: int,
        diagnostics: bool,
        extra_bytes: int,
        chunked: bool = True,
        split: bool = False,
    ) -> int:
        """The most sequences of `length` per forward within eval.batch_tokens and memory
        (the same on every rank), chunked or not, split over the sequence-parallel group or
        whole; SkipLength when not even one fits."""
        chunk = self.cfg.eval.chunk if chunked else None
        held = length if self.sp is None or not split else -(-length // self.sp.size)
        budget = self._min(free_bytes(self.device)) * self.cfg.eval.memory_fraction
        batch = max(1, self.cfg.eval.batch_tokens // length)
        element = self.model.embed.weight.element_size()
        need = lambda b: (  # noqa: E731
            forward_bytes(self.model.cfg, b, held, diagnostics, element, chunk) + extra_bytes
        )
        while batch > 1 and need(batch) > budget:
            batch //= 2
        if need(batch) > budget:
            raise SkipLength(
                f"needs about {_size(need(1))} for one sequence, {_size(budget)} available "
                f"(eval.memory_fraction={self.cfg.eval.memory_fraction} of the free memory)"
            )
        return batch

    def held_out(self) -> Tensor | None:
        """eval.windows windows of the longest evaluation length the val split has room for
        ([n, L + 1]; None if it has room for none). Every length is evaluated on the same
        tokens, these windows cut into shorter ones."""
        tokens = read_manifest(self.cfg.data.path)["val"]["tokens"]
        fitting = [n for n in self.lengths if tokens // (n + 1) > 0]
        if not fitting:
            return None
        length = fitting[-1]
        count = min(self.cfg.eval.windows, tokens // (length + 1))
        return validation_windows(self.cfg.data.path, length, count, self.cfg.eval.seed)

    def _describe(self, held_out: Tensor | None) -> dict | None:
        """The text every length predicts: windows x (length + 1) tokens drawn with seed from
        the val split of the dataset of that fingerprint."""
        if held_out is None:
            return None
        n, length = held_out.shape
        dataset = read_manifest(self.cfg.data.path)["fingerprint"]
        return {"length": length - 1, "windows": n, "seed": self.cfg.eval.seed, "dataset": dataset}

    def _windows(self, held_out: Tensor | None, length: int) -> Tensor:
        """The held-out windows cut into consecutive windows of `length` (+ 1 target)."""
        if held_out is None or held_out.shape[1] < length + 1:
            tokens = read_manifest(self.cfg.data.path)["val"]["tokens"]
            raise SkipLength(
                f"the val split of {self.cfg.data.path} ({tokens:,} tokens) is shorter than "
                f"one window of {length} + 1 tokens; prepare it with a larger --val-fraction"
            )
        pieces = (held_out.shape[1] - 1) // length
        cut = held_out[:, : pieces * length + 1].unfold(1, length + 1, length)
        return cut.reshape(-1, length + 1)

    def _perplexity(
        self, length: int, held_out: Tensor | None, diagnostics: bool, extra_bytes: int
    ) -> dict:
        """ppl, ppl_beyond and (diagnostics) the attention statistics at one length."""
        windows = self._windows(held_out, length)
        count = windows.shape[0]
        # Diagnostics on the pieces of the first diagnostic_windows held-out windows: the same
        # text at every length.
        per_held_out = count // held_out.shape[0]
        n_diag = min(self.cfg.eval.diagnostic_windows, held_out.shape[0]) * per_held_out
        n_diag = n_diag if diagnostics else 0
        batch = self._batch_size(length, True, extra_bytes) if n_diag else 1
        split_batch = self._batch_size(length, False, extra_bytes, split=True)
        cfg = self.model.cfg
        sums = torch.zeros(4, dtype=torch.float64)  # nll all, count all, nll beyond, count beyond
        shape = (cfg.n_layers, cfg.n_heads, length if n_diag else 0)
        mass = torch.zeros(shape, dtype=torch.float64)
        entropy = torch.zeros(shape[:2], dtype=torch.float64)
        visited = torch.zeros(2, cfg.n_layers, dtype=torch.float64)  # sum of fractions, count
        beyond = torch.arange(length) >= self.train_length

        def probe(rows: Tensor):
            def record(layer: int, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> None:
                kwargs = _rows(kwargs, rows)
                stats = attention_statistics(q[rows], k[rows], **kwargs)
                mass[layer] += stats.mass.cpu()
                entropy[layer] += stats.entropy.cpu()
                fraction = skipping_visits(q[rows], k[rows], kwargs)
                if fraction is not None:
                    visited[:, layer] += torch.tensor([fraction * len(rows), len(rows)])

            return record

        passes = ((0, n_diag, True, batch), (n_diag, count - n_diag, False, split_batch))
        for first, n, with_probe, size in passes:
            for items in self._shares(n, size, split=not with_probe):
                real = torch.tensor([i >= 0 for i in items])
                chunk = windows[[first + max(i, 0) for i in items]]
                rows = real.nonzero().flatten().to(self.device)
                if with_probe:
                    use_probe = bool(real.any())
                    hidden = self._hidden(chunk[:, :-1], probe(rows) if use_probe else None)
                    offset = 0
                else:
                    hidden, offset = self._split_hidden(chunk[:, :-1])
                weight = real.double()
                for local, logits in self._head(hidden):
                    start = offset + local
                    logits = logits[:, : max(0, length - start)]  # padding: no target
                    targets = chunk[:, 1 + start : 1 + start + logits.shape[1]].to(self.device)
                    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                    nll = nll.double().cpu() * weight[:, None]
                    far = beyond[start : start + nll.shape[1]]
                    sums += torch.stack(
                        [nll.sum(), weight.sum() * nll.shape[1], nll[:, far].sum(),
                         weight.sum() * far.sum()]
                    )  # fmt: skip
        sums = self._sum(sums)
        result = {"windows": count, "ppl": math.exp(sums[0] / sums[1])}
        if sums[3] > 0:
            result["ppl_beyond"] = math.exp(sums[2] / sums[3])
        if n_diag:
            result["diagnostics"] = self._summarise(
                self._sum(mass), self._sum(entropy), n_diag, length
            )
            fraction, count = self._sum(visited)
            if count.all():
                result["diagnostics"]["visited_fraction"] = _rounded(fraction / count)
        return result

    def _summarise(self, mass: Tensor, entropy: Tensor, windows: int, length: int) -> dict:
        """Per-query means of the summed statistics of `windows` windows of `length`."""
        queries = windows * length
        per_query = mass / queries  # [layers, HQ, length]: each query's row sums to 1
        covered = per_query.cumsum(-1).contiguous()
        mixing = {}
        for eps in self.cfg.eval.mixing_eps:
            target = torch.full((*covered.shape[:-1], 1), 1 - eps, dtype=covered.dtype)
            keys = torch.searchsorted(covered, target).squeeze(-1) + 1
            mixing[str(eps)] = keys.clamp(max=length).tolist()
        edges = [0, 1, *[2**k for k in range(1, max(1, math.ceil(math.log2(length))))], length]
        edges = sorted(set(edges))
        bins = torch.stack([per_query[..., a:b].sum(-1) for a, b in itertools.pairwise(edges)], -1)
        result = {
            "mixing_window": mixing,
            "entropy": _rounded(entropy / queries),
            "mass_by_distance": {"bin_edges": edges, "mass": _rounded(bins)},
        }
        if length > self.train_length:
            far_queries = windows * (length - self.train_length)
            result["far_mass"] = _rounded(mass[..., self.train_length :].sum(-1) / far_queries)
        return result

    def _passkey(self, length: int, tokenizer, extra_bytes: int) -> dict:
        """Accuracy and answer NLL per depth at one length."""
        ev = self.cfg.eval
        cases = [(d, t) for d in ev.passkey_depths for t in range(ev.passkey_trials)]
        prompts = [
            passkey_prompt(tokenizer, length, d, passkey_key(ev.seed, length, d, t))
            for d, t in cases
        ]
        if any(p is None for p in prompts):
            raise SkipLength(f"the passkey prompt's fixed text is longer than {length} tokens")
        tokens = torch.tensor([p.tokens for p in prompts])
        answer = max(p.answer for p in prompts)
        sums = torch.zeros(len(ev.passkey_depths), 3, dtype=torch.float64)  # right, nll, cases
        batch = self._batch_size(length, False, extra_bytes, split=True)
        for items in self._shares(len(cases), batch, split=True):
            chunk = tokens[[max(i, 0) for i in items]]
            logits = self._last_logits(*self._split_hidden(chunk[:, :-1]), length, answer)
            for row, i in enumerate(items):
                if i < 0 or (self.sp is not None and self.sp.rank > 0):  # counted once a group
                    continue
                n = prompts[i].answer
                predicted, expected = logits[row, -n:].cpu(), chunk[row, -n:]
                right = bool((predicted.argmax(-1) == expected).all())
                nll = F.cross_entropy(predicted, expected).item()
                sums[i // ev.passkey_trials] += torch.tensor([float(right), nll, 1.0])
        sums = self._sum(sums)
        depths = [str(d) for d in ev.passkey_depths]
        return {
            "passkey": dict(zip(depths, (sums[:, 0] / sums[:, 2]).tolist(), strict=True)),
            "passkey_nll": dict(zip(depths, _rounded(sums[:, 1] / sums[:, 2]), strict=True)),
        }

    def _last_logits(self, hidden: Tensor, offset: int, length: int, count: int) -> Tensor:
        """Float32 logits [B, count, vocab] of the last `count` of `length` positions from
        hidden states of the positions offset.. (under sequence parallelism each rank of the
        group holds some of them: summed over the group)."""
        first = length - count
        low, high = max(first, offset), min(length, offset + hidden.shape[1])
        logits = torch.zeros(
            hidden.shape[0], count, self.model.cfg.vocab_size, device=hidden.device
        )
        # Every rank runs the head (under ZeRO-3 it gathers the weight: a collective).
        mine = hidden[:, low - offset : high - offset] if high > low else hidden[:, :0]
        parts = [part for _, part in self._head(mine)]
        if parts:
            logits[:, low - first : high - first] = torch.cat(parts, dim=1)
        if self.sp is not None:
            torch.distributed.all_reduce(logits, group=self.sp.group)
        return logits

    def receptive_fields(self) -> dict | None:
        """The TRF of the scheme's distance bias per layer and head (None without one)."""
        bias_kind = SCHEMES[self.scheme].bias
        if bias_kind is None:
            return None
        biases = [block.attn.position.bias for block in self.model.blocks]
        with self.gathered([p for b in biases for p in b.parameters()]), torch.no_grad():
            series = [converges(b) for b in biases]
            limits = {eps: [receptive_field_limit(b, eps) for b in biases] for eps in self._eps}
            at_length = {
                str(n): {
                    str(eps): [receptive_field(log_terms(b, n), eps).tolist() for b in biases]
                    for eps in self._eps
                }
                for n in self.lengths
            }
        result = {
            "bias": bias_kind,
            "series": [["converges" if c else "diverges" for c in s.tolist()] for s in series],
            "limit": {
                str(eps): [
                    [k if ok else None for k, ok in zip(*(t.tolist() for t in pair), strict=True)]
                    for pair in per_layer
                ]
                for eps, per_layer in limits.items()
            },
            "at_length": at_length,
        }
        spec = SCHEMES[self.scheme]
        if spec.rotation or spec.transport:
            result["note"] = "of the distance bias alone; the scheme's rotations are not included"
        unresolved = any(
            not ok and c
            for per_layer, s in zip(limits[self._eps[0]], series, strict=True)
            for ok, c in zip(per_layer[1].tolist(), s.tolist(), strict=True)
        )
        if unresolved:
            result["note_limit"] = (
                "a null limit of a converging series: it converges too slowly to resolve"
            )
        return result

    def rotation_drift(self, held_out: Tensor | None, extra_bytes: int) -> dict:
        """`evaluation.rotation_drift` on the first eval.diagnostic_windows held-out windows cut
        at the trained length (the text of the attention diagnostics there), as JSON. Every rank
        runs the same windows. SkipLength when the held-out text has no window that long."""
        length = self.train_length
        windows = self._windows(held_out, length)
        per_held_out = windows.shape[0] // held_out.shape[0]
        count = min(self.cfg.eval.diagnostic_windows, held_out.shape[0]) * per_held_out
        cfg = self.model.cfg
        element = self.model.embed.weight.element_size()
        host = cfg.n_layers * length * cfg.d_model * element  # the inputs of one sequence
        batch = self._batch_size(length, False, extra_bytes, chunked=False)
        batch = min(batch, max(1, DRIFT_HOST_BYTES // host))
        tokens = windows[:count, :-1]
        found = rotation_drift(
            self.model,
            (tokens[i : i + batch].to(self.device) for i in range(0, count, batch)),
            forward=lambda tokens: self.forward(tokens, None),
            gathered=self.gathered,
        )
        return {
            "length": length,
            "windows": count,
            "tokens": found["tokens"],
            "std": "population",
            "theta": _rounded(found["theta"]),
            "static": _rounded(found["static"]),
            "spread": _rounded(found["spread"]),
        }

    def _drift(self, results: dict, held_out: Tensor | None, extra_bytes: int) -> None:
        """results["rotation_drift"] (null without learned rotations, the reason in
        "unavailable"; left out, the reason in "skipped", when it cannot run)."""
        if not has_learned_rotations(self.scheme):
            results["rotation_drift"] = None
            results["unavailable"]["rotation_drift"] = (
                f"{self.scheme} has no learned rotation increments"
            )
            return
        try:
            drift = self.rotation_drift(held_out, extra_bytes)
        except SkipLength as e:
            results["skipped"]["rotation_drift"] = str(e)
            log.warning("eval: no rotation drift: %s", e)
            return
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e) or self.world.world_size > 1:
                raise
            results["skipped"]["rotation_drift"] = f"out of memory: {str(e).splitlines()[0]}"
            log.warning("eval: the rotation drift ran out of memory, skipped")
            return
        results["rotation_drift"] = drift
        log.info(
            "eval: rotation drift from RoPE at length %d, largest over layers and pairs "
            "(median over heads, relative to theta_p): static %.3g, spread %.3g",
            drift["length"], max(map(max, drift["static"])), max(map(max, drift["spread"])),
        )  # fmt: skip

    @property
    def _eps(self) -> list[float]:
        return list(self.cfg.eval.mixing_eps)

    # ------------------------------------------------------------------ everything

    def run(self, *, step: int, tokens: int | None = None) -> dict:
        """Every length, in increasing order; the results (the same on every rank)."""
        with torch.no_grad():
            return self._run(step, tokens)

    def _run(self, step: int, tokens: int | None) -> dict:
        start = time.perf_counter()
        tokenizer = load_tokenizer(self.cfg.data.path) if self.passkey_lengths else None
        held_out = self.held_out()
        results: dict = {
            "step": step,
            "tokens": tokens,
            "scheme": self.scheme,
            "train_length": self.train_length,
            "lengths": self.lengths,
            "windows": {},
            "ppl": {},
            "ppl_beyond": {},
            "mixing_window": {},
            "far_mass": {},
            "entropy": {},
            "mass_by_distance": {},
            "visited_fraction": {},
            "passkey": {},
            "passkey_nll": {},
            "held_out": self._describe(held_out),
            "receptive_field": self.receptive_fields(),
            "skipped": {},
            "unavailable": {},
            "seconds": {},
        }
        if not self.diagnosable and self.diagnostic_lengths:
            results["unavailable"]["diagnostics"] = PATH_UNSUPPORTED
        if results["receptive_field"] is None:
            results["unavailable"]["receptive_field"] = (
                f"{self.scheme} has no distance bias (the TRF is a property of one)"
            )
        extra = gathered_bytes(self.model) if self.world.world_size > 1 else 0
        self._drift(results, held_out, extra)
        bar = tqdm(self.lengths, desc="eval", unit="length", disable=not self.world.is_main)
        for length in bar:
            bar.set_postfix(length=length)
            key, began = str(length), time.perf_counter()
            diagnostics = self.diagnosable and length in self.diagnostic_lengths
            try:
                found = self._perplexity(length, held_out, diagnostics, extra)
                results["windows"][key] = found["windows"]
                results["ppl"][key] = found["ppl"]
                if "ppl_beyond" in found:
                    results["ppl_beyond"][key] = found["ppl_beyond"]
                for name, value in found.get("diagnostics", {}).items():
                    results[name][key] = value
                if length in self.passkey_lengths:
                    try:
                        for name, value in self._passkey(length, tokenizer, extra).items():
                            results[name][key] = value
                    except SkipLength as e:
                        results["skipped"][f"passkey@{length}"] = str(e)
            except SkipLength as e:
                results["skipped"][key] = str(e)
                log.warning("eval: skipping length %d: %s", length, e)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_out_of_memory(e) or self.world.world_size > 1:
                    raise  # with several ranks, one that stops would leave the others waiting
                results["skipped"][key] = f"out of memory: {str(e).splitlines()[0]}"
                log.warning("eval: length %d ran out of memory, skipped", length)
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            results["seconds"][key] = round(time.perf_counter() - began, 2)
            if key in results["ppl"]:
                beyond = results["ppl_beyond"].get(key)
                log.info(
                    "eval step %d, length %d: ppl %.4g%s (%d windows, %.1fs)",
                    step, length, results["ppl"][key],
                    "" if beyond is None else f", beyond L_train {beyond:.4g}",
                    results["windows"][key], results["seconds"][key],
                )  # fmt: skip
        results["seconds"]["total"] = round(time.perf_counter() - start, 2)
        return results


def scalars(results: dict) -> dict[str, float]:
    """The TensorBoard scalars of one evaluation: extrap/ppl@L, extrap/ppl_beyond@L, the
    mean passkey accuracy extrap/passkey@L, the mean over layers of the key blocks skipping
    visits extrap/visited_fraction@L and, with learned rotations, per layer the largest
    drift over pairs extrap/rotation_static@layer<i> and extrap/rotation_spread@layer<i>."""
    found = {f"extrap/ppl@{n}": v for n, v in results["ppl"].items()}
    found.update({f"extrap/ppl_beyond@{n}": v for n, v in results["ppl_beyond"].items()})
    for n, per_layer in results.get("visited_fraction", {}).items():
        found[f"extrap/visited_fraction@{n}"] = sum(per_layer) / len(per_layer)
    for n, by_depth in results["passkey"].items():
        found[f"extrap/passkey@{n}"] = sum(by_depth.values()) / len(by_depth)
    found.update(drift_scalars(results.get("rotation_drift")))
    return found
