"""rotalibi's model as Hugging Face transformers loads it, and its cached decoding.

Self-contained (torch and transformers only): `python -m launch.export RUN --hf` copies this
file verbatim into the export, where `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` finds it through config.json's `auto_map`. rotalibi's own
`Transformer.decode` uses its decoding core (`DecodingCache`, `attend_new_tokens`).

Every forward call is incremental: the new tokens' queries attend to the cached keys and to
their own, so a forward without a cache is the same computation from an empty one (queries in
chunks of QUERY_CHUNK: memory O(T x chunk), never T x T). Per layer, the cache keeps
- keys rotated by their accumulated angle (PaTH: transported by the Householder products up
  to the newest token; H_t is applied to every cached key when token t arrives) and values
  (rotated for accrot_v and hybrid), in float32 at least;
- the newest token's accumulated angle, float64 reduced mod 2 pi: phi_t = phi_{t-1} + delta_t
  (DESIGN.md's precision contract);
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
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

TWO_PI = 2 * math.pi
QUERY_CHUNK = 256
ROTATIONS = (None, "rope", "learned", "scaled", "random")
DISTANCE_BIASES = (None, "alibi", "kerple_log", "kerple_power", "sandwich", "type1", "type2")


# ---------------------------------------------------------------------------------------------
# Decoding core (torch only)


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


# ---------------------------------------------------------------------------------------------
# The model, with the parameter names of rotalibi's `model.Transformer`


def rope_frequencies(head_dim: int, base: float) -> Tensor:
    """theta_p = base^(-2p/d), p = 0..d/2-1 (float64)."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's head slopes (float32): 2^(-8h/H), for H not a power of two the interleaving."""
    if math.log2(n_heads).is_integer():
        return torch.tensor([2 ** (-8 * h / n_heads) for h in range(1, n_heads + 1)])
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.cat((alibi_slopes(closest), extra))


def sinusoidal_embedding(positions: Tensor, dim: int) -> Tensor:
    """Absolute sinusoidal embeddings [B, T, dim] (sin half, cos half), computed in float64."""
    freq = 10000 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angle = positions[..., None].double() * freq
    return torch.cat((angle.sin(), angle.cos()), dim=-1)


class RotalibiConfig(PretrainedConfig):
    """An exported rotalibi model: its ModelConfig with the scheme spelled out as the
    mechanisms it combines (rotation, rotate_values, bias, forget, window, decay, transport,
    absolute), and the length it was trained at."""

    model_type = "rotalibi"
    attribute_map = {  # noqa: RUF012 (transformers' convention)
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "train_length",
    }

    def __init__(
        self,
        scheme: str = "nope",
        vocab_size: int = 2048,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 4,
        mlp_hidden: int = 384,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        train_length: int = 128,
        rotation: str | None = None,
        rotate_values: bool = False,
        bias: str | None = None,
        forget: bool = False,
        window: int | None = None,
        decay: bool = False,
        transport: bool = False,
        absolute: bool = False,
        rope_base: float = 10000.0,
        xpos_scale_base: float = 512.0,
        xpos_gamma: float = 0.4,
        sandwich_dim: int = 128,
        path_rank: int = 16,
        path_conv: int = 3,
        use_cache: bool = True,
        **kwargs,
    ):
        self.scheme, self.vocab_size, self.d_model = scheme, vocab_size, d_model
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads
        self.mlp_hidden, self.norm_eps, self.init_std = mlp_hidden, norm_eps, init_std
        self.train_length, self.rotation, self.rotate_values = train_length, rotation, rotate_values
        self.bias, self.forget, self.window, self.decay = bias, forget, window, decay
        self.transport, self.absolute, self.rope_base = transport, absolute, rope_base
        self.xpos_scale_base, self.xpos_gamma = xpos_scale_base, xpos_gamma
        self.sandwich_dim, self.path_rank, self.path_conv = sandwich_dim, path_rank, path_conv
        self.use_cache = use_cache
        super().__init__(**kwargs)
        problems = [
            f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}"
            for key, value, allowed in (
                ("rotation", rotation, ROTATIONS),
                ("bias", bias, DISTANCE_BIASES),
            )
            if value not in allowed
        ]
        if d_model % n_heads or (d_model // n_heads) % 2 or n_heads % n_kv_heads:
            problems.append(f"heads {n_heads}/{n_kv_heads} do not fit d_model={d_model}")
        if problems:
            raise ValueError(f"not a rotalibi model this file knows: {'; '.join(problems)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class DistanceBias(nn.Module):
    """b(n) for distances n >= 0, per query head: ALiBi, KERPLE (log, power), Sandwich and
    the two log-type biases."""

    def __init__(self, config: RotalibiConfig):
        super().__init__()
        self.kind, self.n_heads, self.sandwich_dim = (
            config.bias,
            config.n_heads,
            config.sandwich_dim,
        )
        if self.kind in ("kerple_log", "kerple_power"):
            self.r1 = nn.Parameter(torch.zeros(self.n_heads))
            self.r2 = nn.Parameter(torch.zeros(self.n_heads))

    def forward(self, n: Tensor) -> Tensor:
        """n [...] float distances -> bias [HQ, ...]."""
        n = n[None]
        m = alibi_slopes(self.n_heads).to(n).view(-1, *([1] * (n.dim() - 1)))
        if self.kind == "alibi":
            return -m * n
        if self.kind == "type1":
            return -torch.log1p(m * n)
        if self.kind == "type2":
            z = torch.log(3 + m * n)
            return -(z + torch.log(z))
        if self.kind == "sandwich":
            k = torch.arange(self.sandwich_dim // 2, dtype=torch.float64, device=n.device)
            omega = 10000 ** (-2 * k / self.sandwich_dim)
            heads = torch.arange(1, self.n_heads + 1, dtype=torch.float64, device=n.device)
            lam = (self.n_heads / (8 * heads)).to(n.dtype).view_as(m)
            return lam * (torch.cos(n[..., None] * omega.to(n.dtype)).sum(-1) - omega.numel())
        r1 = F.softplus(self.r1).to(n.dtype).view_as(m)
        if self.kind == "kerple_log":
            return -r1 * torch.log1p(F.softplus(self.r2).to(n.dtype).view_as(m) * n)
        r2 = (2 * torch.sigmoid(self.r2)).to(n.dtype).view_as(m)  # kerple_power
        return -r1 * torch.where(n > 0, n.clamp(min=1) ** r2, torch.zeros_like(n))


class PositionScheme(nn.Module):
    """One layer's position scheme: its parameters, and the keyword arguments of
    `attend_new_tokens` for a layer input."""

    def __init__(self, config: RotalibiConfig):
        super().__init__()
        self.config = config
        H, D = config.n_kv_heads, config.head_dim
        if config.rotation in ("learned", "scaled"):
            self.delta = nn.Linear(config.d_model, H * D // 2)
        if config.rotation == "random":
            self.register_buffer("random_weight", torch.zeros(H * D // 2, config.d_model))
            self.register_buffer("random_bias", torch.zeros(H * D // 2))
        if config.bias is not None:
            self.bias = DistanceBias(config)
        if config.forget:
            self.forget = nn.Linear(config.d_model, config.n_heads)
        if config.transport:
            self.w_down = nn.Linear(config.d_model, config.path_rank, bias=False)
            self.w_up = nn.Linear(config.path_rank, H * D, bias=False)
            self.w_conv = nn.Parameter(torch.zeros(H * D, config.path_conv))
            self.beta = nn.Linear(config.d_model, H)

    def forward(self, x: Tensor) -> dict:
        config, (B, n, _) = self.config, x.shape
        angle_dtype = torch.promote_types(x.dtype, torch.float32)
        inputs: dict = {"rotate_values": config.rotate_values, "window": config.window}
        if config.rotation == "rope":
            inputs["theta"] = rope_frequencies(config.head_dim, config.rope_base).to(x.device)
        elif config.rotation == "learned":
            inputs["delta"] = self.delta(x).view(B, n, config.n_kv_heads, -1).to(angle_dtype)
        elif config.rotation == "scaled":  # theta_p 2 sigmoid(c_p + w_p . x_t)
            gain = 2 * torch.sigmoid(self.delta(x).to(angle_dtype))
            theta = rope_frequencies(config.head_dim, config.rope_base).to(x.device)
            inputs["delta"] = gain.view(B, n, config.n_kv_heads, -1) * theta.to(angle_dtype)
        elif config.rotation == "random":
            delta = F.linear(x, self.random_weight.to(x.dtype), self.random_bias.to(x.dtype))
            inputs["delta"] = delta.view(B, n, config.n_kv_heads, -1).to(angle_dtype)
        if config.bias is not None:
            inputs["bias"] = self.bias
        if config.forget:
            inputs["log_forget"] = F.logsigmoid(self.forget(x).to(angle_dtype))
        if config.decay:
            D = config.head_dim
            zeta = (torch.arange(0, D, 2, device=x.device) + config.xpos_gamma * D) / (
                (1 + config.xpos_gamma) * D
            )
            inputs["decay"] = (zeta.double().log() / config.xpos_scale_base).to(angle_dtype)
        if config.transport:
            u = self.w_up(self.w_down(x))
            inputs["path"] = (u, self.w_conv, 2 * torch.sigmoid(self.beta(x)))
        return inputs


class Attention(nn.Module):
    def __init__(self, config: RotalibiConfig):
        super().__init__()
        D, HQ, H = config.head_dim, config.n_heads, config.n_kv_heads
        self.wq = nn.Linear(config.d_model, HQ * D, bias=False)
        self.wk = nn.Linear(config.d_model, H * D, bias=False)
        self.wv = nn.Linear(config.d_model, H * D, bias=False)
        self.wo = nn.Linear(HQ * D, config.d_model, bias=False)
        self.position = PositionScheme(config)

    def forward(self, x: Tensor, state: LayerCache, step: Step) -> Tensor:
        B, n, _ = x.shape
        D = self.position.config.head_dim
        q, k, v = (proj(x).view(B, n, -1, D) for proj in (self.wq, self.wk, self.wv))
        o = attend_new_tokens(state, step, q, k, v, **self.position(x))
        return self.wo(o.flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, config: RotalibiConfig):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: RotalibiConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, state: LayerCache, step: Step) -> Tensor:
        x = x + self.attn(self.attn_norm(x), state, step)
        return x + self.mlp(self.mlp_norm(x))


class RotalibiPreTrainedModel(PreTrainedModel):
    config_class = RotalibiConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # noqa: RUF012 (transformers' convention)

    def _init_weights(self, module: nn.Module) -> None:
        """Weights of a model built from its config alone (from_pretrained loads them all)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, PositionScheme) and module.config.transport:
            nn.init.zeros_(module.w_conv)
            module.w_conv.data[:, -1] = 1.0


class RotalibiModel(RotalibiPreTrainedModel):
    """The decoder without its head: embeddings, blocks, final norm."""

    def __init__(self, config: RotalibiConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.post_init()

    def forward(self, input_ids: Tensor, cache: DecodingCache, step: Step) -> Tensor:
        x = self.embed(input_ids)
        if self.config.absolute:
            x = x + sinusoidal_embedding(step.positions, self.config.d_model).to(x.dtype)
        for block, state in zip(self.blocks, cache.layers, strict=True):
            x = block(x, state, step)
        return self.norm(x)


class RotalibiForCausalLM(RotalibiPreTrainedModel, GenerationMixin):
    """A rotalibi language model. `past_key_values` is its own `DecodingCache` (returned when
    use_cache; `generate` carries it), so `generate` feeds it only the new tokens."""

    _tied_weights_keys = ["lm_head.weight"]  # noqa: RUF012 (transformers' convention)
    _is_stateful = True  # its cache is its own: generate must not build a DynamicCache

    def __init__(self, config: RotalibiConfig):
        super().__init__(config)
        self.model = RotalibiModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        past_key_values: DecodingCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of input_ids [B, n], the tokens after those in past_key_values.
        attention_mask [B, cached + n] (or [B, n]): 0 marks padding. labels: the loss of the
        next-token predictions (shifted here; -100 ignored)."""
        if past_key_values is not None and not isinstance(past_key_values, DecodingCache):
            raise TypeError(
                "rotalibi models keep their own DecodingCache in past_key_values "
                f"(got {type(past_key_values).__name__}); pass None to start one"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values or DecodingCache(self.config.n_layers)
        n = input_ids.shape[1]
        real = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask[:, -n:].bool()
        )
        step = cache.extend(real)
        logits = self.lm_head(self.model(input_ids, cache, step))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values: DecodingCache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """Only the tokens the cache has not seen."""
        if isinstance(past_key_values, DecodingCache):
            input_ids = input_ids[:, past_key_values.length :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
