"""A Llama-style decoder: pre-norm RMSNorm, SwiGLU MLP, no biases, grouped-query attention,
optional tied embeddings, and a pluggable position scheme (model/schemes.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import kernels
from model.chunked import chunked_hidden
from model.config import SCHEMES, ModelConfig
from model.decoding import DecodingCache, LayerCache, Step, attend_new_tokens
from model.partitioned import full
from model.positions import sinusoidal_embedding
from model.schemes import PositionScheme, query_heads

if TYPE_CHECKING:
    from model.sequence_parallel import SequenceParallel

LOSS_CHUNK = 2048  # positions whose logits exist at once when the model computes the loss

# Called by each attention layer with (layer, q, k, v, kwargs of `kernels.attention`) before it
# attends; see `Transformer.attention_probe`.
AttentionProbe = Callable[[int, Tensor, Tensor, Tensor, dict], None]


class Projection(nn.Linear):
    """A bias-free linear layer whose weight `Transformer.reset_parameters` draws. It skips
    nn.Linear's own (kaiming) draw, which would be overwritten: two thirds of the time of
    building a model, on every rank under zero.Init."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        """Nothing here: the model draws the weight (`Transformer.reset_parameters`)."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, window: int | None):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.probe: AttentionProbe | None = None
        self.sequence_parallel: SequenceParallel | None = None
        self.deterministic = False  # kernels.attention's (Transformer.deterministic)
        D, HQ, H = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        self.wq = Projection(cfg.d_model, HQ * D)
        self.wk = Projection(cfg.d_model, H * D)
        self.wv = Projection(cfg.d_model, H * D)
        self.wo = Projection(HQ * D, cfg.d_model)
        self.position = PositionScheme(cfg, layer, window)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, T, HQ, D], k and v [B, T, H, D]."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.cfg.n_heads, -1)
        k = self.wk(x).view(B, T, self.cfg.kv_heads, -1)
        v = self.wv(x).view(B, T, self.cfg.kv_heads, -1)
        return q, k, v

    def prepare(
        self, x: Tensor, positions: Tensor, doc_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, dict]:
        """q, k, v (`project`) and the scheme's kwargs for the attention."""
        return *self.project(x), self.position(x, positions, doc_ids)

    def forward(self, x: Tensor, positions: Tensor, doc_ids: Tensor | None) -> Tensor:
        """x [B, T, d_model]: the whole sequence, or this rank's slice of it under sequence
        parallelism (positions and doc_ids [B, T] are the whole sequence's either way)."""
        q, k, v = self.project(x)
        inputs = self.position.token_inputs(x)
        sp = self.sequence_parallel
        if sp is None:
            o = self._attend(q, k, v, inputs, positions, doc_ids, x.dtype)
            return self.wo(o.flatten(2))
        order = sp.head_order(self.cfg.kv_heads)
        if order is not None:  # dealt to the ranks in this order (SequenceParallel.head_order)
            kv_order = torch.tensor(order, device=x.device)
            q_order = query_heads(kv_order, self.cfg.n_heads // self.cfg.kv_heads)
            q, k, v = q[:, :, q_order], k[:, :, kv_order], v[:, :, kv_order]
            inputs = {name: t[:, :, kv_order] for name, t in inputs.items()}
        inputs = {name: sp.to_heads(t) for name, t in inputs.items()}
        heads = torch.tensor(sp.heads(self.cfg.kv_heads), device=x.device)
        o = sp.attention(self._attend)(q, k, v, inputs, positions, doc_ids, x.dtype, heads)
        if order is not None:
            o = o[:, :, q_order.argsort()]
        return self.wo(o.flatten(2))

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        inputs: dict[str, Tensor],
        positions: Tensor,
        doc_ids: Tensor | None,
        dtype: torch.dtype,
        heads: Tensor | None = None,
    ) -> Tensor:
        """Attention over the whole sequence for the heads q, k, v hold (`heads`: the indices of
        their key/value heads; all, in order, when None)."""
        plan = self.position.plan(inputs, positions, doc_ids, dtype, heads)
        kwargs = dict(
            plan, doc_ids=doc_ids, skip_eps=self.cfg.alibi_skip_eps, block=self.cfg.attn_block
        )
        if self.probe is not None:
            self.probe(self.layer, q, k, v, kwargs)
        with torch.profiler.record_function("rotalibi.attention"):  # named in train.profile
            return kernels.attention(q, k, v, deterministic=self.deterministic, **kwargs)

    def decode(self, x: Tensor, state: LayerCache, step: Step) -> Tensor:
        """Attention of a decoding step's new tokens over the cache (`Transformer.decode`)."""
        o = attend_new_tokens(state, step, *self.project(x), **self.position.decoding_inputs(x))
        return self.wo(o.flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Projection(cfg.d_model, cfg.hidden_dim)
        self.up = Projection(cfg.d_model, cfg.hidden_dim)
        self.down = Projection(cfg.hidden_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, window: int | None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer, window)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, positions: Tensor, doc_ids: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, doc_ids)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: Tensor, state: LayerCache, step: Step) -> Tensor:
        x = x + self.attn.decode(self.attn_norm(x), state, step)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. `window` is the sliding window of the `local` scheme (the trained
    length unless the config names one). With `activation_checkpointing` set, training
    recomputes each block's activations in the backward pass instead of keeping them."""

    def __init__(self, cfg: ModelConfig, train_length: int):
        super().__init__()
        problems = cfg.check()
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        self.cfg = cfg
        window = cfg.window or train_length
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer, window) for layer in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Projection(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual outputs scaled by 1/sqrt(2 n_layers). Each
        weight is gathered in turn when ZeRO-3 partitioned it at construction (zero.Init)."""
        std, residual_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)

        def init(weight: nn.Parameter, weight_std: float) -> None:
            with full(weight):
                nn.init.normal_(weight, std=weight_std)

        init(self.embed.weight, std)
        if not self.cfg.tie_embeddings:
            init(self.lm_head.weight, std)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for linear in (attn.wq, attn.wk, attn.wv, mlp.gate, mlp.up):
                init(linear.weight, std)
            for linear in (attn.wo, mlp.down):
                init(linear.weight, residual_std)
            attn.position.reset_parameters()

    @property
    def sequence_parallel(self) -> SequenceParallel | None:
        """This rank's sequence-parallel group (model/sequence_parallel.py), or None."""
        return self.blocks[0].attn.sequence_parallel

    @sequence_parallel.setter
    def sequence_parallel(self, sp: SequenceParallel | None) -> None:
        for block in self.blocks:
            block.attn.sequence_parallel = sp

    @property
    def deterministic(self) -> bool:
        """Whether attention runs deterministically on a GPU (train.deterministic)."""
        return self.blocks[0].attn.deterministic

    @deterministic.setter
    def deterministic(self, deterministic: bool) -> None:
        for block in self.blocks:
            block.attn.deterministic = deterministic

    def forward(
        self,
        tokens: Tensor,
        doc_ids: Tensor | None = None,
        *,
        head: bool = True,
        targets: Tensor | None = None,
        chunk: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """tokens [B, T] -> logits [B, T, vocab]. doc_ids [B, T] marks packed documents.
        head=False returns the final normalised hidden states [B, T, d_model] instead, for
        callers that apply `lm_head` a chunk of positions at a time (long-context evaluation).
        With targets [B, T] (-100: ignored): (the sum of the next-token cross entropies in
        float32, the number of targets counted), the logits made LOSS_CHUNK positions at a time
        and remade in the backward, so no [T, vocab] tensor ever exists.
        Under sequence parallelism tokens, doc_ids and targets are the whole sequence's and
        everything returned is this rank's slice of the positions (`sequence_parallel`).
        With `chunk` (no grad, head=False, no targets): the same hidden states from
        `model.chunked.chunked_hidden`, `chunk` positions at a time (long-context evaluation)."""
        if chunk is not None:
            if head or targets is not None or torch.is_grad_enabled():
                raise ValueError("the chunked forward is no-grad and returns hidden states only")
            return chunked_hidden(self, tokens, doc_ids, chunk)
        B, T = tokens.shape
        sp = self.sequence_parallel
        if sp is not None and T % sp.size:
            raise ValueError(
                f"sequence length {T} is not a multiple of sequence_parallel={sp.size}"
            )
        positions = kernels.document_positions(doc_ids, B, T, tokens.device)
        x = self.embed(tokens if sp is None else sp.local(tokens))
        if SCHEMES[self.cfg.scheme].absolute:
            local = positions if sp is None else sp.local(positions)
            x = x + sinusoidal_embedding(local, self.cfg.d_model).to(x.dtype)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, positions, doc_ids, use_reentrant=False)
            else:
                x = block(x, positions, doc_ids)
        x = self.norm(x)
        if targets is not None:
            return self._loss_terms(x, targets if sp is None else sp.local(targets))
        return self.lm_head(x) if head else x

    def _loss_terms(self, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(Sum of the cross entropies, count of targets) of hidden [B, T, d] and targets [B, T],
        LOSS_CHUNK positions at a time; in training each chunk's logits are recomputed in the
        backward instead of kept."""
        hidden, targets = hidden.flatten(0, 1), targets.flatten()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), LOSS_CHUNK):
            chunk = (hidden[start : start + LOSS_CHUNK], targets[start : start + LOSS_CHUNK])
            if torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss, *chunk, use_reentrant=False)
            else:
                total = total + self._chunk_loss(*chunk)
        return total, (targets != -100).sum()

    def _chunk_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        logits = self.lm_head(hidden).float()
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")

    @torch.no_grad()
    def decode(self, tokens: Tensor, cache: DecodingCache) -> Tensor:
        """Logits [B, n, vocab] of tokens [B, n] that follow those already in `cache`, which
        this extends (start from `model.decoding.DecodingCache(n_layers)`). Each
        token costs O(cached length), not a forward over the whole text; one text per row."""
        step = cache.extend(torch.ones_like(tokens, dtype=torch.bool))
        x = self.embed(tokens)
        if SCHEMES[self.cfg.scheme].absolute:
            x = x + sinusoidal_embedding(step.positions, self.cfg.d_model).to(x.dtype)
        for block, state in zip(self.blocks, cache.layers, strict=True):
            x = block.decode(x, state, step)
        return self.lm_head(self.norm(x))

    @contextmanager
    def attention_probe(self, probe: AttentionProbe) -> Iterator[None]:
        """Within the `with` block, every attention layer calls probe(layer, q, k, v, kwargs)
        with its inputs (q, k, v before any rotation; kwargs of `kernels.attention`: the
        scheme's plan, doc_ids, block) before attending."""
        for block in self.blocks:
            block.attn.probe = probe
        try:
            yield
        finally:
            for block in self.blocks:
                block.attn.probe = None

    def loss(self, tokens: Tensor, targets: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """Mean next-token cross entropy; targets equal to -100 are ignored."""
        total, count = self.forward(tokens, doc_ids, targets=targets)
        return total / count
