"""Position tables shared by the model and its Hugging Face export: RoPE frequencies, ALiBi
slopes and sinusoidal embeddings, torch only (the export inlines this module: model/hf/source.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, base: float) -> Tensor:
    """theta_p = base^(-2p/d), p = 0..d/2-1 (float64). From an integer arange: under
    DeepSpeed's zero.Init a floating arange comes out in the training dtype."""
    return base ** (-torch.arange(0, head_dim, 2).double() / head_dim)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's head slopes (float32): 2^(-8h/H), for H not a power of two the interleaving."""
    if math.log2(n_heads).is_integer():
        # as_tensor, which zero.Init leaves alone (it patches torch.tensor).
        return torch.as_tensor([2 ** (-8 * h / n_heads) for h in range(1, n_heads + 1)])
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.cat((alibi_slopes(closest), extra))


def sinusoidal_embedding(positions: Tensor, dim: int) -> Tensor:
    """Absolute sinusoidal embeddings [B, T, dim] (sin half, cos half), computed in float64."""
    freq = 10000 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angle = positions[..., None].double() * freq
    return torch.cat((angle.sin(), angle.cos()), dim=-1)
