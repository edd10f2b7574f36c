"""The model's configuration: the position schemes as data (`SCHEMES`: the mechanisms each one
combines) and `ModelConfig`, a plain dataclass that doubles as the OmegaConf schema.
model/schemes.py holds the modules that implement the mechanisms."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchemeSpec:
    """The mechanisms one scheme combines."""

    # Source of the angles: "rope"; "learned" (increments b + W x_t, free); "scaled"
    # (increments theta_p 2 sigmoid(c_p + w_p . x_t), relative to each pair's frequency);
    # "random" (frozen, data-dependent).
    rotation: str | None = None
    rotate_values: bool = False
    bias: str | None = None  # a DistanceBias kind
    forget: bool = False  # FoX's forget gate: logit_ij + sum of log f_t over (j, i]
    window: bool = False
    decay: bool = False  # xPos
    transport: bool = False  # PaTH
    absolute: bool = False  # sinusoidal embeddings added to the token embeddings


SCHEMES: dict[str, SchemeSpec] = {
    "nope": SchemeSpec(),
    "sinusoidal": SchemeSpec(absolute=True),
    "rope": SchemeSpec(rotation="rope"),
    "alibi": SchemeSpec(bias="alibi"),
    "kerple_log": SchemeSpec(bias="kerple_log"),
    "kerple_power": SchemeSpec(bias="kerple_power"),
    "sandwich": SchemeSpec(bias="sandwich"),
    "xpos": SchemeSpec(rotation="rope", decay=True),
    "type1": SchemeSpec(bias="type1"),
    "type2": SchemeSpec(bias="type2"),
    "local": SchemeSpec(rotation="rope", window=True),
    "accrot": SchemeSpec(rotation="learned"),
    "accrot_v": SchemeSpec(rotation="learned", rotate_values=True),
    "random_accrot": SchemeSpec(rotation="random"),
    "path": SchemeSpec(transport=True),
    "hybrid": SchemeSpec(rotation="learned", rotate_values=True, bias="alibi"),
    "path_alibi": SchemeSpec(transport=True, bias="alibi"),
    # The factorial that locates the hybrid's deficit (docs/ablation.md), and forget gates.
    "rope_alibi": SchemeSpec(rotation="rope", bias="alibi"),
    "vorope_alibi": SchemeSpec(rotation="rope", rotate_values=True, bias="alibi"),
    "accrot_alibi": SchemeSpec(rotation="learned", bias="alibi"),
    "accrot_scaled": SchemeSpec(rotation="scaled"),
    "accrot_alibi_scaled": SchemeSpec(rotation="scaled", bias="alibi"),
    "hybrid_scaled": SchemeSpec(rotation="scaled", rotate_values=True, bias="alibi"),
    "fox": SchemeSpec(forget=True),
    "hybrid_fox": SchemeSpec(rotation="scaled", rotate_values=True, forget=True),
    "path_fox": SchemeSpec(transport=True, forget=True),
}

LEARNED_ROTATIONS = ("learned", "scaled")  # rotations whose increments the model learns


@dataclass
class ModelConfig:
    """A Llama-style decoder and its position scheme (see docs/design.md for the schemes)."""

    scheme: str = field(default="hybrid", metadata={"choices": sorted(SCHEMES)})
    vocab_size: int = field(default=2048, metadata={"min": 2})
    d_model: int = field(default=128, metadata={"min": 2})
    n_layers: int = field(default=2, metadata={"min": 1})
    n_heads: int = field(default=4, metadata={"min": 1})
    # Grouped-query attention: key/value heads; None means n_heads (plain multi-head).
    n_kv_heads: int | None = field(default=None, metadata={"min": 1})
    # SwiGLU hidden width; None means 8/3 d_model rounded up to a multiple of 64.
    mlp_hidden: int | None = field(default=None, metadata={"min": 1})
    tie_embeddings: bool = True
    norm_eps: float = field(default=1e-5, metadata={"min": 0.0})
    init_std: float = field(default=0.02, metadata={"min": 0.0})

    # Position-scheme knobs (each used only by the schemes that name it).
    rope_base: float = field(default=10000.0, metadata={"min": 1.0})
    # Sliding window of `local`; None means the trained length (data.seq_len).
    window: int | None = field(default=None, metadata={"min": 1})
    xpos_scale_base: float = field(default=512.0, metadata={"min": 1.0})
    xpos_gamma: float = field(default=0.4, metadata={"min": 0.0})
    sandwich_dim: int = field(default=128, metadata={"min": 2})
    # Relative spread of random_accrot's frozen increments around the RoPE frequencies.
    random_accrot_spread: float = field(default=0.5, metadata={"min": 0.0})
    random_accrot_seed: int = 0
    path_rank: int = field(default=16, metadata={"min": 1})
    path_conv: int = field(default=3, metadata={"min": 1})

    # Attention tiles for the blockwise CPU path (memory is O(T x block), never O(T^2)).
    attn_block: int = field(default=64, metadata={"min": 1})
    # ALiBi heads skip the key blocks that move the attention output by at most this much,
    # relative to the largest value vector (a proven bound: kernels/alibi_reach.py); 0: never.
    alibi_skip_eps: float = field(default=1e-6, metadata={"min": 0.0})

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-(8 * self.d_model // 3) // 64) * 64

    def check(self) -> list[str]:
        """Cross-field problems, each a sentence naming the keys and the fix."""
        problems = []
        if self.d_model % self.n_heads:
            problems.append(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "pick n_heads dividing d_model"
            )
        elif self.head_dim % 2:
            problems.append(
                f"head dim d_model/n_heads={self.head_dim} is odd; rotations need an even "
                "head dim: change model.d_model or model.n_heads"
            )
        if self.n_heads % self.kv_heads:
            problems.append(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads="
                f"{self.kv_heads}; grouped-query attention needs n_heads = k * n_kv_heads"
            )
        if self.sandwich_dim % 2:
            problems.append(f"model.sandwich_dim={self.sandwich_dim} must be even")
        return problems
