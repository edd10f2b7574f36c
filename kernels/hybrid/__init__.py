"""The hybrid attention's Triton kernels: the chunkwise angle scan and the fused attention.

Triton decides when it is imported and when a kernel is defined whether kernels run compiled
or in its numpy interpreter (TRITON_INTERPRET=1). Without CUDA nothing can run compiled, so on
such a machine this package turns the interpreter on before Triton is imported: the tests then
run the very same kernels on the CPU (slowly; small shapes only). If Triton is already imported
without it, the import stops and says so. With CUDA, set TRITON_INTERPRET=1 yourself to debug;
without, TRITON_INTERPRET=0 keeps the kernels compilable for GPU targets that cannot run here
(`bench.compile_gate`).
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise ImportError(
            "kernels.hybrid runs in Triton's interpreter on a machine without CUDA, but Triton was "
            "imported before TRITON_INTERPRET=1 was set; set it in the environment (as "
            "tests/conftest.py does) or import kernels.hybrid before anything imports Triton"
        )
    os.environ["TRITON_INTERPRET"] = "1"

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
