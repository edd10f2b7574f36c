"""The hybrid attention's Triton kernels: the chunkwise angle scan and the fused attention.

Triton decides when a kernel is defined whether it runs compiled or in its numpy interpreter
(TRITON_INTERPRET=1). Without CUDA nothing can run compiled, so on such a machine this package
turns the interpreter on before defining any kernel: the tests then run the very same kernels on
the CPU (slowly; small shapes only). With CUDA, set TRITON_INTERPRET=1 yourself to debug.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.hybrid.attention import fused_attention, hybrid_attention
from kernels.hybrid.documents import cu_seqlens_bounds, document_bounds
from kernels.hybrid.scan import scan_angles

__all__ = [
    "cu_seqlens_bounds",
    "document_bounds",
    "fused_attention",
    "hybrid_attention",
    "scan_angles",
]
