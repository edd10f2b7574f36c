"""No forward pass at T = 16384 creates a tensor anywhere near T x T."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import ModelConfig, Transformer

T = 16384


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


@pytest.mark.parametrize("scheme", ["hybrid", "path_alibi", "xpos", "local", "sandwich"])
def test_forward_at_16k_has_no_quadratic_tensor(scheme):
    cfg = ModelConfig(scheme=scheme, vocab_size=512, d_model=128, n_layers=1, n_heads=4)
    model = Transformer(cfg, train_length=128)
    tokens = torch.randint(0, 512, (1, T))
    recorder = LargestTensor()
    with torch.no_grad(), recorder:
        logits = model(tokens)
    assert logits.shape == (1, T, 512)
    numel, op = recorder.largest
    assert numel <= T * T // 8, f"{op} made a tensor of {numel} elements"
