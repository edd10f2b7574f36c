"""Cached decoding: the incremental attention of `Transformer.decode` and of the Hugging Face
export (model/hf/modeling_rotalibi.py), torch only. The export inlines this module into the one
file it ships (model/hf/source.py), so it imports nothing but torch and the standard library.

Every forward call is incremental: the new tokens' queries attend to the cached keys and to
their own, so a forward without a cache is the same computation from an empty one (queries in
chunks of QUERY_CHUNK: memory O(T x chunk), never T x T). Per layer, the cache keeps
- keys rotated by their accumulated angle (PaTH: transported by the Householder products up
  to the newest token; H_t is applied to every cached key when token t arrives) and values
  (rotated for accrot_v and hybrid), in float32 at least;
- the newest token's accumulated angle, float64 reduced mod 2 pi: phi_t = phi_{t-1} + delta_t
  (docs/design.md's precision contract);
- forget gates (FoX): every cached key's cumulative log forget gate F_j and the newest F, in
  float64 (logit_ij + F_i - F_j);
- PaTH's last path_conv - 1 projections, for its short causal convolution;
- with a window (`local`), only the last window - 1 keys.
Distance biases (ALiBi, KERPLE, ...), windows and xPos decay use the distance between cache
slots. Padding (attention_mask 0) is invisible: no real token attends to it, and positions,
angles and PaTH's transport skip it, so a padded row gives the logits of the row alone.
PaTH attends token by token (T sequential steps of O(T d) each); the other schemes attend
QUERY_CHUNK queries at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TWO_PI = 2 * math.pi
QUERY_CHUNK = 256


@dataclass
class LayerCache:
    """One layer's decoding state (see the module docstring)."""

    keys: Tensor | None = None  # [B, H, S, D]
    values: Tensor | None = None  # [B, H, S, D]
    first: int = 0  # the slot of keys[:, :, 0] (a window drops older keys)
    angle: Tensor | None = None  # [B, H, D/2] float64: phi of the newest slot
    gates: Tensor | None = None  # [B, H, G, S] float64: F of each cached key
    gate: Tensor | None = None  # [B, H, G] float64: F of the newest slot
    conv: Tensor | None = None  # [B, path_conv - 1, H * D]: PaTH's newest projections


@dataclass
class Step:
    """The slots one forward call adds: the first one's index, the tokens' positions in their
    text, which of them are real (not padding), and which of all slots so far are real."""

    start: int
    positions: Tensor  # [B, n]
    real: Tensor  # [B, n] bool
    all_real: Tensor  # [B, start + n] bool


class DecodingCache:
    """What incremental decoding carries from one call to the next: every layer's state, the
    slots seen (tokens and padding) and which of them hold real tokens."""

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.length = 0
        self.real: Tensor | None = None  # [B, length] bool

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots seen so far (transformers' `generate` asks)."""
        return self.length

    def reorder_cache(self, rows: Tensor) -> None:
        """Keep the rows `rows` (in that order): beam search's reordering."""
        self.real = self.real[rows]
        for state in self.layers:
            for name in ("keys", "values", "angle", "gates", "gate", "conv"):
                value = getattr(state, name)
                if value is not None:
                    setattr(state, name, value[rows])

    def extend(self, real: Tensor) -> Step:
        """Add n slots (`real` [B, n]: which hold real tokens) and describe them."""
        seen = 0 if self.real is None else self.real.sum(1, keepdim=True)
        positions = (seen + real.long().cumsum(1) - 1).clamp(min=0)
        all_real = real if self.real is None else torch.cat((self.real, real), dim=1)
        step = Step(self.length, positions, real, all_real)
        self.real, self.length = all_real, self.length + real.shape[1]
        return step


def rotate(x: Tensor, phi: Tensor) -> Tensor:
    """R(phi) x on half-split pairs (x[p], x[p + D/2]); x [B, n, Hx, D], phi [B, n, H, D/2];
    head h of x uses phi of head h // (Hx / H)."""
    if x.shape[2] != phi.shape[2]:
        phi = phi.repeat_interleave(x.shape[2] // phi.shape[2], dim=2)
    cos, sin = phi.cos().to(x.dtype), phi.sin().to(x.dtype)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def _attend(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    q_first: int,
    k_first: int,
    all_real: Tensor,
    bias: Callable[[Tensor], Tensor] | None,
    window: int | None,
    decay: Tensor | None,
    gates: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Softmax attention of q [B, H, G, m, D] (scaled; slots q_first..) over keys and values
    [B, H, S, D] (slots k_first..); gates: the forget gates' F of the queries [B, H, G, m] and
    of the keys [B, H, G, S]. Returns [B, H, G, m, D]."""
    _, H, G, m, _ = q.shape
    S = keys.shape[2]
    q_slots = torch.arange(q_first, q_first + m, device=q.device)
    k_slots = torch.arange(k_first, k_first + S, device=q.device)
    distance = q_slots[:, None] - k_slots[None, :]  # [m, S]
    if decay is not None:
        # exp(decay (i - j)) = exp(decay (i - q_first)) exp(decay (q_first - j)): both factors
        # stay below exp(|decay| m) whatever the distance.
        pair_decay = torch.cat((decay, decay)).to(q.dtype)
        q = q * torch.exp(pair_decay * (q_slots - q_first)[:, None].to(q.dtype))
        keys = keys * torch.exp(pair_decay * (q_first - k_slots)[:, None].to(q.dtype))
    scores = q @ keys[:, :, None].transpose(-1, -2)  # [B, H, G, m, S]
    if bias is not None:
        scores = scores + bias(distance.clamp(min=0).to(scores.dtype)).view(H, G, m, S)
    if gates is not None:
        scores = scores + (gates[0][..., None] - gates[1][..., None, :]).to(scores.dtype)
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    # Padding is visible only to itself (its own output is never used).
    visible = visible & (all_real[:, None, k_first : k_first + S] | (distance == 0))  # [B, m, S]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    return scores.softmax(dim=-1) @ values[:, :, None]


def _path_conv(state: LayerCache, step: Step, u: Tensor, weight: Tensor, heads: int) -> Tensor:
    """PaTH's w_t: the short causal convolution of the projections u [B, n, H*D] (cached ones
    first), L2-normalised per head: [B, n, H, D]."""
    B, n, _ = u.shape
    width = weight.shape[1]
    u = torch.where(step.real[..., None], u, 0.0)
    history = state.conv if state.conv is not None else u.new_zeros(B, width - 1, u.shape[-1])
    full = torch.cat((history, u), dim=1)
    w = sum(
        weight[:, width - 1 - lag] * full[:, width - 1 - lag : width - 1 - lag + n]
        for lag in range(width)
    )
    state.conv = full[:, full.shape[1] - (width - 1) :]
    return F.normalize(w.view(B, n, heads, -1), dim=-1)


def attend_new_tokens(
    state: LayerCache,
    step: Step,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    theta: Tensor | None = None,
    delta: Tensor | None = None,
    rotate_values: bool = False,
    bias: Callable[[Tensor], Tensor] | None = None,
    window: int | None = None,
    decay: Tensor | None = None,
    log_forget: Tensor | None = None,
    path: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Causal attention of a step's n tokens over the cached ones and themselves; updates
    `state`. q [B, n, HQ, D]; k, v [B, n, H, D]. Returns [B, n, HQ, D].

    theta [D/2] (float64): RoPE, angles position x theta. delta [B, n, H, D/2]: increments of
    accumulated angles. rotate_values: rotate v too (the output back by -phi). bias: distances
    (float) -> logit bias [HQ, ...]. window: only keys at distance < window. decay [D/2]: xPos
    per-pair log-decay per token. log_forget [B, n, HQ]: FoX's log forget gates (<= 0), the
    logit of i and j gaining their sum over (j, i]. path (u [B, n, H*D], conv weight [H*D, c],
    beta [B, n, H]):
    PaTH's projections before its convolution, and its Householder strengths.
    """
    B, n, HQ, D = q.shape
    H = k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    angles = None
    if theta is not None:
        angles = (step.positions[..., None].double() * theta).remainder(TWO_PI)
        angles = angles[:, :, None].expand(B, n, H, -1)
    elif delta is not None:
        increments = torch.where(step.real[..., None, None], delta.double(), 0.0)
        carried = increments.new_zeros(B, H, D // 2) if state.angle is None else state.angle
        angles = (carried[:, None] + increments.cumsum(dim=1)).remainder(TWO_PI)
        state.angle = angles[:, -1]
    if angles is not None:
        angles = angles.to(work)
        q, k = rotate(q, angles), rotate(k, angles)
        if rotate_values:
            v = rotate(v, angles)
    G = HQ // H
    q = (q * D**-0.5).to(work).view(B, n, H, G, D).permute(0, 2, 3, 1, 4)
    k, v = k.to(work).transpose(1, 2), v.to(work).transpose(1, 2)
    keys = k.new_zeros(B, H, 0, D) if state.keys is None else state.keys
    values = v.new_zeros(B, H, 0, D) if state.values is None else state.values
    new_gates = gates = None
    if log_forget is not None:  # F of the new slots (padding forgets nothing), [B, H, G, n]
        steps = torch.where(step.real[..., None], log_forget.double(), 0.0)
        carried = steps.new_zeros(B, HQ) if state.gate is None else state.gate.flatten(1)
        new_gates = (carried[:, None] + steps.cumsum(dim=1)).view(B, n, H, G).permute(0, 2, 3, 1)
        gates = new_gates if state.gates is None else torch.cat((state.gates, new_gates), -1)
        state.gate = new_gates[..., -1]
    common = dict(all_real=step.all_real, bias=bias, window=window, decay=decay)

    def gates_of(queries: slice, keys_upto: int) -> tuple[Tensor, Tensor] | None:
        """F of this step's queries `queries` and of the first `keys_upto` keys."""
        return None if gates is None else (new_gates[..., queries], gates[..., :keys_upto])

    if path is None:
        keys, values = torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2)
        first, chunk, S = state.first, QUERY_CHUNK, keys.shape[2]
        parts = [
            _attend(
                q[..., c : c + chunk, :],
                keys,
                values,
                step.start + c,
                first,
                gates=gates_of(slice(c, c + chunk), S),
                **common,
            )
            for c in range(0, n, chunk)
        ]
        out = torch.cat(parts, dim=3)
    else:
        u, conv_weight, beta = path
        w = _path_conv(state, step, u, conv_weight, H).to(work).transpose(1, 2)  # [B, H, n, D]
        beta = torch.where(step.real[..., None], beta, 0.0).to(work).transpose(1, 2)  # [B, H, n]
        outs = []
        for t in range(n):
            # H_t = I - beta_t w_t w_t^T reaches every earlier key: they hold H_t ... H_{j+1} k_j.
            w_t = w[:, :, t, None]
            keys = keys - beta[:, :, t, None, None] * (keys * w_t).sum(-1, keepdim=True) * w_t
            keys = torch.cat((keys, k[:, :, t, None]), dim=2)
            values = torch.cat((values, v[:, :, t, None]), dim=2)
            q_t = q[..., t, None, :]
            outs.append(
                _attend(
                    q_t,
                    keys,
                    values,
                    step.start + t,
                    state.first,
                    gates=gates_of(slice(t, t + 1), keys.shape[2]),
                    **common,
                )
            )
        out = torch.cat(outs, dim=3)
    if window is not None:  # later tokens see only the last window - 1 of these keys
        drop = max(0, keys.shape[2] - (window - 1))
        keys, values = keys[:, :, drop:], values[:, :, drop:]
        gates = None if gates is None else gates[..., drop:]
        state.first += drop
    state.keys, state.values, state.gates = keys, values, gates
    o = out.permute(0, 3, 1, 2, 4).reshape(B, n, HQ, D)
    if angles is not None and rotate_values:
        o = rotate(o, -angles)
    return o.to(q.dtype)
