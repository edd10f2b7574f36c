"""Every Triton kernel the model launches, compiled ahead of time for real GPUs, on any machine,
no GPU needed: `make check-gpu-compile` (`python -m bench.compile_gate`).

What runs is found by running it: for every scheme of `model.config.SCHEMES`, with and without
packed documents, ALiBi skipping and the deterministic mode (train.deterministic), every input dtype
and head dim, multi-head and grouped-query, one attention layer of the model runs forward and
backward on CPU tensors that say they are on CUDA while `kernels.FUSED_DEVICES` includes the CPU.
Each kernel launch is recorded instead of run: the kernel, its arguments, its constexprs. Triton's
own JIT binder then computes from those arguments the specialization a GPU launch gets
(`tt.divisibility=16` on 16-byte aligned pointers and on integers that are multiples of 16, integers
equal to 1 as constants), and each autotuned kernel's configs are pruned by its own
`early_config_prune` for the target's shared memory. So the gate follows the kernels, their flags
and their signatures as they change.

Each variant is lowered through ptxas for sm_80 (A100) and sm_90 (H100, H200). It fails the
gate on a compile error, on shared memory above the target's per-block limit or above the
estimate the pruning trusts (`attention.shared_memory_estimate`), or on any spilled register,
except for the float32 attention kernels, whose spills are reported (without tensor cores they
hold their tiles in registers; the bfloat16/float16 configs that spill are pruned). ptxas's -v
report gives registers and spills, the compiled metadata the shared memory.

`--subset` (the suite runs it: tests/kernels/test_kernels_aot.py) compiles every flag
combination of the schemes once (at d = 32, the smallest tiles kept, the targets taking turns;
the deterministic mode's at the main combination) and every tile config of the main
combination (scheme hybrid, bfloat16, d = 128, packed documents, skipping) on both.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

# Read by Triton when it is imported: the kernels must be compilable (not interpreter
# functions), compiled anew (a cached kernel skips ptxas) and ptxas's -v report printed.
ENVIRONMENT = {"TRITON_INTERPRET": "0", "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}

# Shared memory one block may use (opt-in maximum) per compute capability.
SHARED_MEMORY_LIMIT = {80: 166_912, 90: 232_448}
ARCHS = tuple(SHARED_MEMORY_LIMIT)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (32, 64, 128)  # kernels.hybrid.attention.HEAD_DIMS, read without importing Triton
# The traced layer: B = 2 rows of T = 16 tokens, 16 query heads; key/value heads: multi-head
# and grouped-query (4 query heads per key/value head, as configs/7b.yaml).
BATCH, LENGTH, HEADS = 2, 16, 16
KV_HEADS = {"mha": 16, "gqa": 4}
MAIN = {"scheme": "hybrid", "dtype": "bf16", "head_dim": 128, "docs": True, "skip": True}


@dataclass(frozen=True)
class Context:
    """Where a launch came from: the scheme and the layer's inputs."""

    scheme: str
    dtype: str
    head_dim: int
    heads: str  # a key of KV_HEADS
    docs: bool
    skip: bool
    deterministic: bool = False  # train.deterministic: pinned tiles, dq without atomics


@dataclass
class Variant:
    """One compilation: a kernel with the JIT's signature, constexprs and specialization
    attributes (by argument name) and its launch options; the contexts that launch it."""

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict[str, list]
    options: dict[str, int]
    flags: dict[str, object]  # the constexprs the launcher chose, less tiles and head dim
    tuned: bool  # launched through the autotuner
    contexts: list[Context] = field(default_factory=list)

    @property
    def dtype(self) -> str:
        return self.contexts[0].dtype

    @property
    def head_dim(self) -> int:
        return self.contexts[0].head_dim

    def key(self) -> str:
        return json.dumps(
            [self.module, self.kernel, self.signature, self.constexprs, self.attrs, self.options],
            sort_keys=True,
            default=str,
        )

    def config(self) -> triton.Config:
        tiles = {k: v for k, v in self.constexprs.items() if k.startswith("BLOCK_")}
        return triton.Config(tiles, **self.options)

    def estimate(self) -> int:
        """The shared memory the launcher's pruning expects (autotuned kernels)."""
        from kernels.hybrid import attention

        return attention.shared_memory_estimate(
            self.config(), kernel=self.kernel, dtype=self.dtype, head_dim=self.head_dim
        )

    def gates_spills(self) -> bool:
        """Spills fail the gate, except in the float32 attention kernels (reported)."""
        return not ("BLOCK_M" in self.constexprs and self.dtype == "fp32")


@dataclass
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
        if self.variant.tuned and self.shared > self.variant.estimate():
            return f"{self.shared:,} B of shared memory, above the pruning's estimate"
        if self.variant.gates_spills() and self.spilled > 0:
            return f"{self.spilled} B spilled per thread"
        return None


# ----------------------------------------------------------------------------------------------
# Tracing the launches
# ----------------------------------------------------------------------------------------------


class _SaysCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA (the launchers' device checks pass); ops on it
    return the same kind."""

    @property
    def is_cuda(self) -> bool:
        return True


@dataclass
class Launch:
    fn: JITFunction
    tuner: Autotuner | None
    args: tuple
    kwargs: dict


class _Target:
    """A stand-in for Triton's active driver: the target and device properties of `arch`."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = self

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_properties(self, device: int | None = None) -> dict:
        return {"max_shared_mem": SHARED_MEMORY_LIMIT[self.arch], "multiprocessor_count": 132}


@contextlib.contextmanager
def target(arch: int) -> Iterator[None]:
    """Triton's active driver replaced by `_Target(arch)` (no GPU needed)."""
    previous = driver._active
    driver.set_active(_Target(arch))
    try:
        yield
    finally:
        driver._active = previous


@contextlib.contextmanager
def recording(launches: list[Launch]) -> Iterator[None]:
    """Kernel launches appended to `launches` instead of run; the fused kernels serve the CPU."""
    import kernels

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, None, args, kwargs))

    def tuner_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        launches.append(Launch(fn, self, args, kwargs))

    saved = JITFunction.run, Autotuner.run, kernels.FUSED_DEVICES
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    kernels.FUSED_DEVICES = (*kernels.FUSED_DEVICES, "cpu")
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run, kernels.FUSED_DEVICES = saved


@functools.lru_cache(maxsize=1)
def _layer(scheme: str, dtype: str, head_dim: int, heads: str) -> torch.nn.Module:
    """One attention layer of the model (the contexts come in this order: one at a time)."""
    from model.config import ModelConfig
    from model.transformer import Attention

    cfg = ModelConfig(
        scheme=scheme, d_model=HEADS * head_dim, n_heads=HEADS, n_kv_heads=KV_HEADS[heads]
    )
    torch.manual_seed(0)
    return Attention(cfg, layer=0, window=LENGTH // 2).to(DTYPES[dtype])


def trace(context: Context, arch: int = ARCHS[-1]) -> list[Launch]:
    """The kernel launches of one attention layer's forward and backward in `context`, on
    sm_`arch` (the deterministic mode pins tiles by the device's shared memory)."""
    import kernels
    from kernels.alibi_reach import DEFAULT_SKIP_EPS
    from kernels.hybrid import attention

    c = context
    layer = _layer(c.scheme, c.dtype, c.head_dim, c.heads)
    layer.cfg.alibi_skip_eps = DEFAULT_SKIP_EPS if c.skip else 0.0
    layer.deterministic = c.deterministic
    for cached in vars(attention).values():  # choices cached per device: made anew per target
        if callable(getattr(cached, "cache_clear", None)):
            cached.cache_clear()
    x = torch.randn(BATCH, LENGTH, layer.cfg.d_model, dtype=DTYPES[c.dtype])
    x = x.as_subclass(_SaysCuda).requires_grad_()
    doc_ids = (torch.arange(LENGTH) >= LENGTH // 3).long().expand(BATCH, LENGTH)
    doc_ids = doc_ids if c.docs else None
    positions = kernels.document_positions(doc_ids, BATCH, LENGTH, x.device)
    launches: list[Launch] = []
    with recording(launches), target(arch):
        out = layer(x, positions, doc_ids)
        torch.autograd.grad(out, [x], torch.ones_like(out))
    return launches


def contexts(*, dtypes=tuple(DTYPES), head_dims=HEAD_DIMS, heads=tuple(KV_HEADS)) -> list[Context]:
    """Every scheme that launches a kernel x dtype x head dim x key/value heads x documents
    x skipping. A scheme launches none (it runs PyTorch on CUDA) when its cheapest context
    (float32, the smallest head dim, multi-head) launches none."""
    from model.config import SCHEMES

    probe = dict(dtype="fp32", head_dim=min(HEAD_DIMS), heads="mha", docs=True, skip=True)
    launching = [s for s in SCHEMES if trace(Context(s, **probe))]
    return [
        Context(scheme, dtype, d, h, docs, skip, deterministic)
        for scheme in launching for dtype in dtypes for d in head_dims for h in heads
        for docs in (False, True) for skip in (False, True) for deterministic in (False, True)
    ]  # fmt: skip


@functools.cache
def _binder(fn: JITFunction, arch: int) -> tuple:
    """Triton's backend for sm_`arch` and the JIT's binder of `fn` for it."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialize(launch: Launch, arch: int, extra: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) that Triton's JIT derives from the launch's
    arguments for sm_`arch` (with `extra` launch kwargs: an autotune config's), by argument
    name: the JIT's own binder and packing (`JITFunction.run` before it compiles)."""
    fn = launch.fn
    backend, binder = _binder(fn, arch)
    kwargs = {**launch.kwargs, **extra}
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = fn.arg_names
    return (
        signature,
        {names[path[0]]: value for path, value in constexprs.items()},
        {names[path[0]]: value for path, value in attrs.items()},
        {k: v for k, v in kwargs.items() if k not in names},
    )


def _configs(launch: Launch, arch: int) -> list[dict]:
    """The launch kwargs of each config the kernel's autotuner keeps on sm_`arch` ({} once for
    a kernel launched directly)."""
    if launch.tuner is None:
        return [{}]
    tuner = launch.tuner
    tuner.nargs = dict(zip(tuner.arg_names, launch.args, strict=False))  # the rest: kwargs
    with target(arch):
        kept = tuner.prune_configs(launch.kwargs)
    tuner.nargs = None
    return [c.all_kwargs() for c in kept]


def variants(found: list[Context], workers: int = 1) -> tuple[dict[int, list[Variant]], list[str]]:
    """Per target, the distinct variants the contexts launch (in order of first launch), and
    the contexts that could not be traced, each with its error in one line; traced in
    `workers` processes, a scheme's contexts in one."""
    schemes = list(dict.fromkeys(c.scheme for c in found))
    chunks = [[c for c in found if c.scheme == scheme] for scheme in schemes]
    if workers > 1:
        spawn = multiprocessing.get_context("spawn")  # torch's threads do not survive a fork
        with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
            traced = list(pool.map(_variants, chunks))
    else:
        traced = [_variants(chunk) for chunk in chunks]
    merged: dict[int, dict[str, Variant]] = {arch: {} for arch in ARCHS}
    errors = []
    for by_arch, chunk_errors in traced:
        errors += chunk_errors
        for arch, found_here in by_arch.items():
            for variant in found_here:
                kept = merged[arch].setdefault(variant.key(), variant)
                kept.contexts += [c for c in variant.contexts if c not in kept.contexts]
    return {arch: list(v.values()) for arch, v in merged.items()}, errors


def _variants(found: list[Context]) -> tuple[dict[int, list[Variant]], list[str]]:
    """`variants` of `found` in this process."""
    by_arch: dict[int, dict[str, Variant]] = {arch: {} for arch in ARCHS}
    errors = []
    for context in found:
        try:  # the deterministic mode's tiles depend on the target: traced for each
            for archs in [[a] for a in ARCHS] if context.deterministic else [ARCHS]:
                for launch in trace(context, archs[0]):
                    _add(launch, context, by_arch, archs)
        except Exception as e:  # the gate fails naming it
            first = (str(e).strip().splitlines() or [""])[0]
            errors.append(f"{context}: {type(e).__name__}: {first}")
    return {arch: list(v.values()) for arch, v in by_arch.items()}, errors


def _add(
    launch: Launch, context: Context, by_arch: dict[int, dict[str, Variant]], archs: list[int]
) -> None:
    """The launch's variants on `archs` (one per config kept) added to `by_arch`, or its
    context to theirs when they are there."""
    fn = launch.fn
    flags = {
        k: v for k, v in launch.kwargs.items()
        if k in fn.arg_names and not k.startswith("BLOCK_") and k != "D"
    }  # fmt: skip
    for arch in archs:
        for extra in _configs(launch, arch):
            signature, constexprs, attrs, options = specialize(launch, arch, extra)
            variant = Variant(
                fn.__module__, fn.__name__, signature, constexprs, attrs, options, flags,
                launch.tuner is not None,
            )  # fmt: skip
            variant = by_arch[arch].setdefault(variant.key(), variant)
            if context not in variant.contexts:
                variant.contexts.append(context)


def flag_combination(variant: Variant) -> str:
    return json.dumps([variant.kernel, variant.flags], sort_keys=True)


def subset_contexts() -> list[Context]:
    """The subset's contexts: every flag combination of the schemes at the smallest head dim
    (bfloat16 and float32: the two precisions), multi-head; the main combination, and its
    deterministic mode (whose flags the subset then compiles once)."""
    found = contexts(dtypes=("bf16", "fp32"), head_dims=(min(HEAD_DIMS),), heads=("mha",))
    main = Context(**MAIN, heads="mha")
    deterministic = Context(**MAIN, heads="mha", deterministic=True)
    return [*(c for c in found if not c.deterministic), main, deterministic]


def subset(by_arch: dict[int, list[Variant]]) -> list[tuple[Variant, int]]:
    """Every variant of the main combination on every target, and every other flag
    combination once, with its smallest tiles kept (the quickest to compile), the targets
    taking turns."""
    main = Context(**MAIN, heads="mha")
    chosen = [(v, arch) for arch in ARCHS for v in by_arch[arch] if main in v.contexts]
    done = {flag_combination(v) for v, _ in chosen}
    representative: dict[int, dict[str, Variant]] = {}
    for arch in ARCHS:  # configs are kept largest first: the last variant has the smallest
        representative[arch] = {flag_combination(v): v for v in by_arch[arch]}
    combinations = {c: None for arch in ARCHS for c in representative[arch] if c not in done}
    for turn, combination in enumerate(combinations):
        arch = ARCHS[turn % len(ARCHS)]
        if combination not in representative[arch]:  # reached on the other target only
            arch = next(a for a in ARCHS if combination in representative[a])
        chosen.append((representative[arch][combination], arch))
    return chosen


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------


def _ptxas_report(log: str) -> tuple[int, int]:
    """(registers, spilled bytes per thread: stores) from ptxas -v's report."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if registers is None:
        raise RuntimeError("no ptxas report (Triton did not print its ptxas log)")
    return int(registers.group(1)), int(spills.group(1)) if spills else 0


def source(variant: Variant) -> ASTSource:
    """The variant as Triton's JIT hands it to the compiler."""
    fn = getattr(import_module(variant.module), variant.kernel)
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    constexprs = {index[k]: v for k, v in variant.constexprs.items()}
    attrs = {index[k]: v for k, v in variant.attrs.items()}
    return ASTSource(fn, variant.signature, constexprs, attrs)


def compile_variant(variant: Variant, arch: int) -> Result:
    """Compile `variant` for sm_`arch`; the result, or the compile error in one line."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                source(variant), target=GPUTarget("cuda", arch, 32), options=variant.options
            )
        registers, spilled = _ptxas_report(log.getvalue())
    except Exception as e:  # a compile error of any kind is this variant's result
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Result(variant, arch, error=f"{type(e).__name__}: {first}")
    return Result(variant, arch, compiled.metadata.shared, registers, spilled)


def _compile(item: tuple[Variant, int]) -> Result:
    return compile_variant(*item)


def _line(r: Result) -> str:
    v, problem = r.variant, r.problem()
    tiles = {k: x for k, x in v.constexprs.items() if k.startswith("BLOCK_")}
    line = (
        f"sm_{r.arch} {v.kernel:17} {v.dtype} d={v.head_dim} {tiles} "
        f"w{v.options.get('num_warps', 4)}s{v.options.get('num_stages', 3)}: "
    )
    if r.error is None:
        line += f"{r.shared:,} B shared, {r.registers} registers, {r.spilled} B spilled"
    return line + (f"  FAILS: {problem}" if problem else "")


def to_json(results: list[Result]) -> str:
    return json.dumps([{**asdict(r), "problem": r.problem()} for r in results], default=str)


def run(items: list[tuple[Variant, int]], *, workers: int, out: Path | None) -> list[Result]:
    """Compile every (variant, target) in `workers` processes, printing each result as it
    comes; `out` rewritten every 10 results (a stopped run keeps what it compiled)."""
    results: list[Result] = []
    start = time.monotonic()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_compile, item) for item in items]
        for done, future in enumerate(as_completed(futures), 1):
            results.append(future.result())
            print(f"[{done}/{len(items)} {time.monotonic() - start:.0f} s] {_line(results[-1])}",
                  flush=True)  # fmt: skip
            if out is not None and (done % 10 == 0 or done == len(items)):
                out.write_text(to_json(results))
    return results


def spilling_16bit(results: list[dict]) -> dict[tuple[str, int, int, bool], set[tuple]]:
    """From a gate JSON: the autotuned configs that spilled with 16-bit inputs, as
    `attention.SPILLING_16BIT` holds them."""
    table: dict[tuple[str, int, int, bool], set[tuple]] = {}
    for r in results:
        v = r["variant"]
        if not v["tuned"] or r["error"] is not None or r["spilled"] == 0:
            continue
        context = v["contexts"][0]
        if context["dtype"] == "fp32":
            continue
        tiles = (v["constexprs"]["BLOCK_M"], v["constexprs"]["BLOCK_N"],
                 v["options"]["num_warps"], v["options"]["num_stages"])  # fmt: skip
        key = (v["kernel"], r["arch"], context["head_dim"], context["heads"] != "mha")
        table.setdefault(key, set()).add(tiles)
    return dict(sorted(table.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compile_gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subset", action="store_true", help="the suite's subset (see above)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--dtype", choices=DTYPES, action="append", help="only these input dtypes (repeatable)"
    )
    parser.add_argument("--head-dim", type=int, choices=HEAD_DIMS, action="append")
    parser.add_argument(
        "--heads", choices=tuple(KV_HEADS), action="append",
        help="only these head layouts: mha, or gqa (4 key/value heads for 16 query heads)",
    )  # fmt: skip
    parser.add_argument(
        "--main-flags", action="store_true",
        help="only the main flag combination (every dtype, head dim and tile config)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write every result as JSON here")
    parser.add_argument(
        "--spills", type=Path, help="print attention.SPILLING_16BIT from this JSON and exit"
    )
    args = parser.parse_args(argv)
    if args.spills is not None:
        for key, tiles in spilling_16bit(json.loads(args.spills.read_text())).items():
            print(f"    {key}: {sorted(tiles)},")
        return 0
    if any(os.environ.get(k) != v for k, v in ENVIRONMENT.items()):  # Triton has read it
        command = [sys.executable, "-m", "bench.compile_gate", *sys.argv[1:]]
        os.execve(sys.executable, command, {**os.environ, **ENVIRONMENT})
    if args.subset:
        found = subset_contexts()
    else:
        dtypes, head_dims = tuple(args.dtype or DTYPES), tuple(args.head_dim or HEAD_DIMS)
        found = contexts(dtypes=dtypes, head_dims=head_dims, heads=tuple(args.heads or KV_HEADS))
    if args.main_flags:
        main = {k: v for k, v in MAIN.items() if k not in ("dtype", "head_dim")}
        found = [c for c in found if all(getattr(c, k) == v for k, v in main.items())]
    by_arch, errors = variants(found, args.workers)
    for error in errors:
        print(f"not traced: {error}", flush=True)
    every = [(v, arch) for arch in ARCHS for v in by_arch[arch]]
    items = subset(by_arch) if args.subset else every
    print(f"{len(found)} contexts traced: {len(items)} compilations", flush=True)
    results = run(items, workers=args.workers, out=args.out)
    failures = sum(r.problem() is not None for r in results)
    print(f"{len(results) - failures} of {len(results)} compilations pass the gate")
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
