"""rotalibi's model as Hugging Face transformers loads it.

`python -m launch.export RUN --hf` ships this file as the export's modeling_rotalibi.py, with
its decoding core (model/decoding.py) and position tables (model/positions.py) inlined
(model/hf/source.py), so the shipped file imports only torch and transformers;
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` finds it through
config.json's `auto_map`. rotalibi's own `Transformer.decode` uses the same decoding core.

One copy of the code: the repository holds each part once; the export assembles the file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.decoding import DecodingCache, LayerCache, Step, attend_new_tokens
from model.positions import alibi_slopes, rope_frequencies, sinusoidal_embedding

ROTATIONS = (None, "rope", "learned", "scaled", "random")
DISTANCE_BIASES = (None, "alibi", "kerple_log", "kerple_power", "sandwich", "type1", "type2")


# ---------------------------------------------------------------------------------------------
# The model, with the parameter names of rotalibi's `model.Transformer`


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
