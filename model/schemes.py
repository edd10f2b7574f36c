"""Position schemes: what each one does to attention, as data, and the module that does it.

A scheme is a combination of a few mechanisms (docs/design.md's table):
rotate q/k (and v) by angles, add a distance bias or a data-dependent forget gate (FoX), mask a
window, decay the logit per pair (xPos), transport keys by Householder products (PaTH), or add
absolute embeddings at the input.
`PositionScheme` turns a layer input into the keyword arguments of `kernels.attention`, so the
attention core, and the fused kernel, serve the whole family without a branch per scheme.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import AlibiTable, accumulate_angles
from model.config import LEARNED_ROTATIONS, SCHEMES, ModelConfig
from model.partitioned import full
from model.positions import alibi_slopes, rope_frequencies


def query_heads(kv_heads: Tensor, groups: int) -> Tensor:
    """The query heads that attend with key/value heads `kv_heads` under GQA (`groups` query
    heads to each), in the same order."""
    offsets = torch.arange(groups, device=kv_heads.device)
    return (kv_heads[:, None] * groups + offsets).flatten()


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def forget_bias_for_slopes(slopes: Tensor) -> Tensor:
    """The forget-gate bias b with logsigmoid(b) = -m: a gate that forgets e^-m per token
    is ALiBi with slope m. b = -log(e^m - 1)."""
    return -torch.log(torch.expm1(slopes))


class Float64Constants(nn.Module):
    """A module whose constant buffers (`register_constant`) follow it across devices but stay
    float64 when it is cast: a bfloat16 model (DeepSpeed's bf16) keeps exact RoPE frequencies
    and ALiBi slopes. Their values start from integer tensors or Python numbers, never from a
    floating tensor made by torch.tensor/arange/randn/...: under DeepSpeed's zero.Init those
    come out in the training dtype."""

    def register_constant(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value.double(), persistent=False)
        self._constants = (*getattr(self, "_constants", ()), name)

    def _apply(self, fn, recurse=True):
        exact = {name: self._buffers[name] for name in getattr(self, "_constants", ())}
        super()._apply(fn, recurse)
        for name, value in exact.items():
            self._buffers[name] = value.to(self._buffers[name].device)
        return self


class DistanceBias(Float64Constants):
    """b(n) for distances n = i - j >= 0, per query head: docs/design.md's bias-only schemes."""

    def __init__(self, kind: str, n_heads: int, sandwich_dim: int):
        super().__init__()
        self.kind = kind
        self.register_constant("slopes", alibi_slopes(n_heads))
        if kind in ("kerple_log", "kerple_power"):
            # Learned r1, r2 > 0 through softplus (power: 0 < r2 <= 2 through 2 sigmoid).
            self.r1 = nn.Parameter(torch.empty(n_heads))
            self.r2 = nn.Parameter(torch.empty(n_heads))
        if kind == "sandwich":
            k = torch.arange(sandwich_dim // 2).double()
            self.register_constant("omega", 10000 ** (-2 * k / sandwich_dim))
            heads = torch.arange(1, n_heads + 1).double()
            self.register_constant("lam", n_heads / (8 * heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """kerple_power starts as ALiBi (r1 = slope, r2 = 1); kerple_log as -log(1 + slope n)."""
        with full(*self.parameters()):
            if self.kind == "kerple_log":
                self.r1.data.copy_(_inverse_softplus(torch.ones_like(self.slopes)))
                self.r2.data.copy_(_inverse_softplus(self.slopes))
            elif self.kind == "kerple_power":
                self.r1.data.copy_(_inverse_softplus(self.slopes))
                self.r2.data.zero_()  # 2 sigmoid(0) = 1

    def forward(self, n: Tensor) -> Tensor:
        """n [...] float distances -> bias [H, ...]."""
        n = n[None]
        m = self.slopes.to(n.dtype).view(-1, *([1] * (n.dim() - 1)))
        if self.kind == "alibi":
            return -m * n
        if self.kind == "type1":
            return -torch.log1p(m * n)
        if self.kind == "type2":
            z = torch.log(3 + m * n)
            return -(z + torch.log(z))
        if self.kind == "sandwich":
            cos_sum = torch.cos(n[..., None] * self.omega.to(n.dtype)).sum(-1)
            lam = self.lam.to(n.dtype).view_as(m)
            return lam * (cos_sum - self.omega.numel())
        r1 = F.softplus(self.r1).to(n.dtype).view_as(m)
        if self.kind == "kerple_log":
            return -r1 * torch.log1p(F.softplus(self.r2).to(n.dtype).view_as(m) * n)
        r2 = (2 * torch.sigmoid(self.r2)).to(n.dtype).view_as(m)
        # n^r2 with a finite gradient at n = 0.
        return -r1 * torch.where(n > 0, n.clamp(min=1) ** r2, torch.zeros_like(n))


class PositionScheme(Float64Constants):
    """One layer's position scheme: layer input -> keyword arguments of `kernels.attention`."""

    def __init__(self, cfg: ModelConfig, layer: int, window: int | None):
        super().__init__()
        self.spec = spec = SCHEMES[cfg.scheme]
        self.cfg, self.window = cfg, window if spec.window else None
        H, P = cfg.kv_heads, cfg.head_dim // 2
        theta = rope_frequencies(cfg.head_dim, cfg.rope_base)
        if spec.rotation is not None:
            self.register_constant("theta", theta)
        if spec.rotation in LEARNED_ROTATIONS:
            # learned: delta_t = b + W x_t, b = theta and W = 0 at init.
            # scaled: delta_t = theta 2 sigmoid(c + W x_t), c = 0 and W = 0 at init.
            # Either way the layer starts as RoPE.
            self.delta = nn.Linear(cfg.d_model, H * P)
        if spec.rotation == "random":
            # Frozen random increments theta (1 + spread * N(0, 1) of a random projection of
            # x_t): seeded per layer, saved with the model, identical in train and eval.
            gen = torch.Generator().manual_seed(cfg.random_accrot_seed * 1000 + layer)
            w = theta.new_empty(H * P, cfg.d_model).normal_(generator=gen)
            w *= cfg.random_accrot_spread * theta.repeat(H)[:, None] / math.sqrt(cfg.d_model)
            self.register_buffer("random_weight", w.float())
            self.register_buffer("random_bias", theta.repeat(H).float())
        if spec.bias is not None:
            self.bias = DistanceBias(spec.bias, cfg.n_heads, cfg.sandwich_dim)
        if spec.forget:
            # log f_t = logsigmoid(w . x_t + b) per query head; at init w = 0 and
            # logsigmoid(b) = -m_h, ALiBi's slope: the gate starts as ALiBi.
            self.register_constant("slopes", alibi_slopes(cfg.n_heads))
            self.forget = nn.Linear(cfg.d_model, cfg.n_heads)
        if spec.decay:
            zeta = (torch.arange(0, cfg.head_dim, 2) + cfg.xpos_gamma * cfg.head_dim) / (
                (1 + cfg.xpos_gamma) * cfg.head_dim
            )
            self.register_constant("decay", zeta.log() / cfg.xpos_scale_base)
        if spec.transport:
            self.w_down = nn.Linear(cfg.d_model, cfg.path_rank, bias=False)
            self.w_up = nn.Linear(cfg.path_rank, H * cfg.head_dim, bias=False)
            self.w_conv = nn.Parameter(torch.empty(H * cfg.head_dim, cfg.path_conv))
            self.beta = nn.Linear(cfg.d_model, H)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        own = [p for name, p in self.named_parameters() if not name.startswith("bias.")]
        with full(*own):
            if self.spec.rotation in LEARNED_ROTATIONS:
                nn.init.zeros_(self.delta.weight)
                if self.spec.rotation == "learned":
                    self.delta.bias.data.copy_(self.theta.repeat(self.cfg.kv_heads))
                else:
                    nn.init.zeros_(self.delta.bias)
            if self.spec.forget:
                nn.init.zeros_(self.forget.weight)
                self.forget.bias.data.copy_(forget_bias_for_slopes(self.slopes))
            if self.spec.transport:
                nn.init.normal_(self.w_down.weight, std=std)
                nn.init.normal_(self.w_up.weight, std=std)
                # The short convolution starts as the identity (all weight on the current token).
                nn.init.zeros_(self.w_conv)
                self.w_conv.data[:, -1] = 1.0
                nn.init.normal_(self.beta.weight, std=std)
                nn.init.zeros_(self.beta.bias)
        if self.spec.bias is not None:  # draws no random numbers: the order does not matter
            self.bias.reset_parameters()

    def forward(self, x: Tensor, positions: Tensor, doc_ids: Tensor | None) -> dict:
        """x [B, T, d_model]; positions [B, T] (within document). Returns attention kwargs."""
        return self.plan(self.token_inputs(x), positions, doc_ids, x.dtype)

    def token_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """The scheme's learned per-token inputs, each [B, T, H, ...] (what sequence
        parallelism moves with k and v): angle increments `delta` [.., P]; the forget gates'
        logits `forget` [.., G] (the G query heads of each key/value head); PaTH's projections
        `u` [.., D] (before its convolution) and `beta` [.., 1]."""
        B, T, _ = x.shape
        inputs = {}
        if self.spec.rotation is not None and self.spec.rotation != "rope":
            inputs["delta"] = self._increments(x)
        if self.spec.forget:
            inputs["forget"] = self._forget_logits(x).view(B, T, self.cfg.kv_heads, -1)
        if self.spec.transport:
            inputs["u"] = self.w_up(self.w_down(x)).view(B, T, self.cfg.kv_heads, -1)
            inputs["beta"] = self._beta(x)[..., None]
        return inputs

    def plan(
        self,
        inputs: dict[str, Tensor],
        positions: Tensor,
        doc_ids: Tensor | None,
        dtype: torch.dtype,
        heads: Tensor | None = None,
    ) -> dict:
        """The attention kwargs from `token_inputs` over the whole sequence; positions [B, T];
        dtype: the layer input's. heads: the indices of the key/value heads the inputs hold
        (sequence parallelism), else all of them in order."""
        B, T = positions.shape
        spec, cfg = self.spec, self.cfg
        if heads is None:
            kv, query, count = slice(None), slice(None), cfg.kv_heads
        else:
            kv, query = heads, query_heads(heads, cfg.n_heads // cfg.kv_heads)
            count = len(heads)
        plan: dict = {"window": self.window}
        # Angles are never kept in bfloat16/float16: 2 pi in bfloat16 is off by 0.02 rad.
        angle_dtype = torch.promote_types(dtype, torch.float32)
        if spec.rotation == "rope":
            # t * theta in float64, reduced mod 2 pi: exact at any length.
            phi = (positions[..., None].double() * self.theta).remainder(2 * math.pi)
            plan["angles"] = phi[:, :, None, :].expand(B, T, count, -1).to(angle_dtype)
        elif spec.rotation is not None:
            plan["angles"] = accumulate_angles(inputs["delta"], doc_ids)
        plan["rotate_values"] = spec.rotate_values
        if spec.bias == "alibi":
            # Built from its slopes only where read: the fused CUDA kernel and fla use the slopes.
            plan["bias"] = AlibiTable.of_slopes(self.bias.slopes[query].to(angle_dtype), T)
        elif spec.bias is not None:
            # Distances in at least float32: bfloat16 holds integers exactly only up to 256.
            distances = torch.arange(T, device=positions.device, dtype=angle_dtype)
            plan["bias"] = self.bias(distances)[query]
        if spec.forget:
            # F_t = sum of log f_s over s <= t in float64 (the kernels difference it); F may
            # run across documents: their masks remove every pair that would see it.
            log_forget = F.logsigmoid(inputs["forget"]).flatten(2)  # [B, T, HQ of `heads`]
            plan["gate"] = log_forget.double().cumsum(dim=1)
        if spec.decay:
            plan["decay"] = self.decay.to(angle_dtype)
        if spec.transport:
            plan["transport"] = self._householders(inputs, positions, kv)
        return plan

    def decoding_inputs(self, x: Tensor) -> dict:
        """The keyword arguments of `model.decoding.attend_new_tokens` (incremental
        decoding) for new tokens x [B, n, d_model]: the same scheme as `forward`'s plan."""
        spec, angle_dtype = self.spec, torch.promote_types(x.dtype, torch.float32)
        inputs: dict = {"rotate_values": spec.rotate_values, "window": self.window}
        if spec.rotation == "rope":
            inputs["theta"] = self.theta
        elif spec.rotation is not None:
            inputs["delta"] = self._increments(x)
        if spec.bias is not None:
            inputs["bias"] = self.bias
        if spec.forget:
            inputs["log_forget"] = F.logsigmoid(self._forget_logits(x))
        if spec.decay:
            inputs["decay"] = self.decay.to(angle_dtype)
        if spec.transport:
            inputs["path"] = (self.w_up(self.w_down(x)), self.w_conv, self._beta(x))
        return inputs

    def _increments(self, x: Tensor) -> Tensor:
        """The per-token angle increments delta [B, T, H, P] of learned, scaled or random
        rotations, in at least float32."""
        B, T, _ = x.shape
        angle_dtype = torch.promote_types(x.dtype, torch.float32)
        if self.spec.rotation == "learned":
            delta = self.delta(x)
        elif self.spec.rotation == "scaled":
            # theta_p 2 sigmoid(.) in (0, 2 theta_p): each pair moves at its own frequency's
            # scale, forward only, and by at most twice RoPE's angle per token.
            gain = 2 * torch.sigmoid(self.delta(x).to(angle_dtype))
            theta = self.theta.repeat(self.cfg.kv_heads).to(angle_dtype)
            return (gain * theta).view(B, T, self.cfg.kv_heads, -1)
        else:
            delta = F.linear(x, self.random_weight.to(x.dtype), self.random_bias.to(x.dtype))
        return delta.view(B, T, self.cfg.kv_heads, -1).to(angle_dtype)

    def _forget_logits(self, x: Tensor) -> Tensor:
        """w . x_t + b per query head, [B, T, HQ], in at least float32."""
        return self.forget(x).to(torch.promote_types(x.dtype, torch.float32))

    def _beta(self, x: Tensor) -> Tensor:
        """PaTH's beta_t = 2 sigmoid(.) in (0, 2), [B, T, H]."""
        return 2 * torch.sigmoid(self.beta(x))

    def _householders(
        self, inputs: dict[str, Tensor], positions: Tensor, heads: slice | Tensor
    ) -> tuple[Tensor, Tensor]:
        """PaTH's w_t (the projections u through a short causal conv within the document,
        L2-normed) and beta_t [B, T, H], for the key/value heads `heads`."""
        u = inputs["u"]
        T, D = u.shape[1], u.shape[3]
        width = self.w_conv.shape[1]
        conv = self.w_conv.view(self.cfg.kv_heads, D, width)[heads]
        w = torch.zeros_like(u)
        for lag in range(width):
            shifted = F.pad(u, (0, 0, 0, 0, lag, 0))[:, :T]
            same_doc = (positions >= lag)[..., None, None]
            w = w + conv[..., width - 1 - lag] * torch.where(same_doc, shifted, 0.0)
        return F.normalize(w, dim=-1), inputs["beta"][..., 0]
