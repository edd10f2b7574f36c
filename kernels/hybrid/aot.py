"""Every Triton kernel of the hybrid attention compiled ahead of time for real GPUs, on any
machine, no GPU needed: `make check-gpu-compile` (`python -m kernels.hybrid.aot`).

Triton lowers each kernel with each autotune config that the launcher keeps for the target
(`attention.prune_configs`), through ptxas, for sm_80 (A100) and sm_90 (H100, H200): what a
GPU job compiles on its first call. A variant fails the gate on a compile error, on shared
memory above the target's per-block limit or above the estimate the pruning trusts, or, for
the elementwise kernels and the scan, on any spilled register. The attention kernels' spills
are reported, not gated: at d = 128 nearly every config of the three attention kernels uses
all 255 registers and spills (tens to thousands of bytes per thread; float32, without tensor
cores, up to 200 KB), which is kernel work still to do, not something a config choice fixes.
ptxas's own report (`-v`, which Triton prints when asked) gives registers and spills; the
compiled metadata the shared memory.

`--subset` compiles one variant per kernel and target: bfloat16, d = 128, the largest tiles
kept; the suite runs it (tests/kernels/test_kernels_aot.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from tqdm import tqdm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.hybrid import attention, scan

# Read by Triton when it is imported: the kernels must be compilable (not interpreter
# functions), compiled anew (a cached kernel skips ptxas) and ptxas's -v report printed.
ENVIRONMENT = {"TRITON_INTERPRET": "0", "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}

# Shared memory one block may use (opt-in maximum) per compute capability.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
ARCHS = tuple(SHARED_MEMORY_LIMIT)
DTYPES = ("fp32", "bf16", "fp16")
_FLOAT_SCALARS = {"qk_scale2", "scale"}


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel, its input dtype, constexprs and launch options."""

    kernel: str
    dtype: str  # the q/k/v dtype: "fp32", "bf16" or "fp16"
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    def estimate(self) -> int:
        """The shared memory the launcher's pruning expects (attention kernels)."""
        config = triton.Config(
            {k: self.constexprs[k] for k in ("BLOCK_M", "BLOCK_N")},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        head_dim = self.constexprs["D"]
        return attention.shared_memory_estimate(
            config, kernel=self.kernel, dtype=self.dtype, head_dim=head_dim
        )

    def spill_budget(self) -> int | None:
        """Spilled bytes per thread allowed: none for the elementwise kernels and the scan;
        the attention kernels' spills are reported, not gated (see the module docstring)."""
        return None if self.kernel in _ATTENTION else 0


@dataclass(frozen=True)
class Result:
    variant: Variant
    arch: int
    shared: int | None = None
    registers: int | None = None
    spilled: int | None = None
    error: str | None = None

    def problem(self) -> str | None:
        """Why this compilation fails the gate, or None."""
        if self.error is not None:
            return self.error
        limit = SHARED_MEMORY_LIMIT[self.arch]
        if self.shared > limit:
            return f"{self.shared:,} B of shared memory, above sm_{self.arch}'s {limit:,} B"
        if self.variant.kernel in _ATTENTION and self.shared > self.variant.estimate():
            return f"{self.shared:,} B of shared memory, above the pruning's estimate"
        budget = self.variant.spill_budget()
        if budget is not None and self.spilled > budget:
            return f"{self.spilled} B spilled per thread, above the budget of {budget} B"
        return None


# Each kernel's pointer arguments: in the input dtype; int32 (document bounds, reach); float32.
_POINTERS = {
    "_rotate_kernel": ("X Y", "", "PHI"),
    "_fwd_kernel": ("Q K V O", "STARTS REACH", "PHI SLOPES LSE"),
    "_row_dot_kernel": ("O DO", "", "OUT"),
    "_dkdv_kernel": ("QR K V DOR", "STARTS ENDS REACH", "LSE DELTA SLOPES DQ DK DV"),
    "_unrotate_kernel": ("Q DQ O DO K DK V DV", "", "PHI DQR DKR DVR DPHI"),
    "_scan_kernel": ("", "BOUNDS", "X Y"),
}


def _pointer_types(kernel: str, dtype: str) -> dict[str, str]:
    same, int32, float32 = (names.split() for names in _POINTERS[kernel])
    return {
        **dict.fromkeys(same, dtype),
        **dict.fromkeys(int32, "i32"),
        **dict.fromkeys(float32, "fp32"),
    }


def _function(kernel: str) -> triton.JITFunction:
    module = scan if kernel == "_scan_kernel" else attention
    return getattr(module, kernel)


def _signature(variant: Variant) -> dict[str, str]:
    fn = _function(variant.kernel)
    pointers = _pointer_types(variant.kernel, variant.dtype)
    signature = {}
    for name in fn.arg_names:
        if name in variant.constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return signature


def _ptxas_report(log: str) -> tuple[int, int]:
    """(registers, spilled bytes per thread: stores) from ptxas -v's report."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if registers is None:
        raise RuntimeError("no ptxas report (Triton did not print its ptxas log)")
    return int(registers.group(1)), int(spills.group(1)) if spills else 0


def compile_variant(variant: Variant, arch: int) -> Result:
    """Compile `variant` for sm_`arch`; the result, or the compile error in one line."""
    source = ASTSource(_function(variant.kernel), _signature(variant), variant.constexprs)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        registers, spilled = _ptxas_report(log.getvalue())
    except Exception as e:  # a compile error of any kind is this variant's result
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Result(variant, arch, error=f"{type(e).__name__}: {first}")
    return Result(variant, arch, compiled.metadata.shared, registers, spilled)


_ATTENTION = {
    "_fwd_kernel": attention._fwd,
    "_dkdv_kernel": attention._dkdv,
}


def _flags(kernel: str, dtype: str, d: int, every_feature: bool) -> list[dict]:
    precision = "ieee" if dtype == "fp32" else "tf32"
    base = dict(D=d, ALIBI=True, DOCS=True, WINDOW=every_feature, SKIP=True, PRECISION=precision)
    if kernel != "_fwd_kernel":
        return [base]
    return [{**base, "ROTATE": True, "ROTATE_V": True}]


def variants(*, subset: bool, dtypes: tuple[str, ...] = DTYPES) -> list[tuple[Variant, int]]:
    """(variant, arch) pairs to compile: every autotune config kept for each target, dtype of
    `dtypes` and head dim; with `subset`, bfloat16 at d = 128 and the largest tiles kept only."""
    head_dims = (128,) if subset else attention.HEAD_DIMS
    dtypes = ("bf16",) if subset else dtypes
    found = []
    for arch in ARCHS:
        for dtype in dtypes:
            for d in head_dims:
                for kernel, tuned in _ATTENTION.items():
                    kept = attention.prune_configs(
                        tuned.configs, kernel=kernel, dtype=dtype, head_dim=d,
                        shared_memory=SHARED_MEMORY_LIMIT[arch],
                    )  # fmt: skip
                    if subset:
                        kept = kept[:1]
                    for config in kept:
                        for flags in _flags(kernel, dtype, d, not subset):
                            constexprs = {**flags, **config.kwargs}
                            found.append(
                                (Variant(kernel, dtype, constexprs, config.num_warps,
                                         config.num_stages), arch)
                            )  # fmt: skip
                block = attention.elementwise_block(d)
                elementwise = [
                    Variant("_rotate_kernel", dtype, {"D": d, "BLOCK_T": block}),
                    Variant("_row_dot_kernel", dtype, {"D": d, "BLOCK_T": block}),
                    Variant(
                        "_unrotate_kernel", dtype, {"D": d, "ROTATE_V": True, "BLOCK_T": block}
                    ),
                ]
                found += [(v, arch) for v in elementwise]
        scan_constexprs = {"CHUNK": scan.CHUNK, "BLOCK_P": scan.BLOCK_P, "DOCS": True}
        found += [
            (Variant("_scan_kernel", "fp32", {**scan_constexprs, "REVERSE": reverse}), arch)
            for reverse in ((False,) if subset else (False, True))
        ]
    return found


def _compile(item: tuple[Variant, int]) -> Result:
    return compile_variant(*item)


def run(*, subset: bool, workers: int, dtypes: tuple[str, ...] = DTYPES) -> list[Result]:
    """Compile every variant (in `workers` processes); the results, in order."""
    items = variants(subset=subset, dtypes=dtypes)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        compiled = pool.map(_compile, items)
        return list(tqdm(compiled, total=len(items), desc="compiling", unit="kernel"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", action="store_true", help="one variant per kernel/target")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--dtype", choices=DTYPES, action="append", help="only these input dtypes (repeatable)"
    )
    parser.add_argument("--out", type=Path, help="write every result as JSON here")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in ENVIRONMENT.items()):  # Triton has read it
        command = [sys.executable, "-m", "kernels.hybrid.aot", *sys.argv[1:]]
        os.execve(sys.executable, command, {**os.environ, **ENVIRONMENT})
    dtypes = tuple(args.dtype or DTYPES)
    results = run(subset=args.subset, workers=args.workers, dtypes=dtypes)
    failures = 0
    for r in results:
        v, problem = r.variant, r.problem()
        failures += problem is not None
        tiles = {k: v.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T") if k in v.constexprs}
        line = (
            f"sm_{r.arch} {v.kernel:17} {v.dtype} d={v.constexprs.get('D', '-')} {tiles} "
            f"w{v.num_warps}s{v.num_stages}: "
        )
        if r.error is None:
            line += f"{r.shared:,} B shared, {r.registers} registers, {r.spilled} B spilled"
        print(line + (f"  FAILS: {problem}" if problem else ""))
    if args.out is not None:
        args.out.write_text(json.dumps([{**asdict(r), "problem": r.problem()} for r in results]))
    print(f"{len(results) - failures} of {len(results)} compilations pass the gate")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
