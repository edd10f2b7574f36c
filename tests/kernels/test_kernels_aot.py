"""The compile gate (bench.compile_gate) compiles what runs: the JIT's own specialization, every
flag combination the schemes reach; the pruning's shared-memory estimate bounds what the gate
measured, and no kept 16-bit config spills; the GPU check says what it needs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product

import pytest
import triton
from conftest import ROOT

from kernels.hybrid.attention import (
    DKDV_CONFIGS,
    FWD_CONFIGS,
    SPILLING_16BIT,
    prune_configs,
    shared_memory_estimate,
)
from model.config import SCHEMES

A100, H100 = 166_912, 232_448  # shared memory per block: sm_80, sm_90
LIMIT = {80: A100, 90: H100}
TUNED = ("_dkdv_kernel", "_fwd_kernel")  # the autotuned attention kernels
GATE_JSON = ROOT / "bench" / "results" / "check_gpu_compile_vm.json"
BOTH = (False, True)
COMPILING = {**os.environ, "TRITON_INTERPRET": "0"}  # the gate needs JIT functions


def _config(m: int, n: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _tiles(configs: list[triton.Config]) -> set[tuple[int, int, int, int]]:
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}


def _variant_tiles(variant: dict) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of an autotuned variant in a gate JSON."""
    constexprs, options = variant["constexprs"], variant["options"]
    return (constexprs["BLOCK_M"], constexprs["BLOCK_N"], options["num_warps"],
            options["num_stages"])  # fmt: skip


@pytest.mark.parametrize("limit", [A100, H100])
@pytest.mark.parametrize("kernel", TUNED)
def test_configs_that_do_not_fit_are_pruned(kernel, limit):
    """Every config kept fits (by the estimate the compile gate checks against the compiled
    kernels), largest first; a deliberately oversized config is dropped, and when nothing
    fits the smallest config is left for the compile to judge."""
    configs = [_config(*t) for t in [(16, 16, 4, 2), (64, 64, 4, 3), (512, 512, 8, 4)]]
    for dtype in ("fp32", "bf16"):
        kept = prune_configs(configs, kernel=kernel, dtype=dtype, head_dim=128, shared_memory=limit)
        sizes = [shared_memory_estimate(c, kernel=kernel, dtype=dtype, head_dim=128) for c in kept]
        assert all(size <= limit for size in sizes) and sizes == sorted(sizes, reverse=True)
        assert (512, 512, 8, 4) not in _tiles(kept) and (16, 16, 4, 2) in _tiles(kept)
    fp32 = dict(kernel=kernel, dtype="fp32", head_dim=128)
    assert _tiles(prune_configs(configs, **fp32, shared_memory=1)) == {(16, 16, 4, 2)}


def test_spilling_16bit_configs_are_pruned_on_their_architecture_only():
    """A config listed as spilling for (kernel, sm, d) is dropped there with 16-bit inputs, and
    kept with float32 inputs and on the other architecture."""
    (kernel, arch, d, grouped), spilling = next(iter(SPILLING_16BIT.items()))
    tiles = sorted(spilling)[0]
    configs = [_config(*tiles), _config(16, 16, 4, 1)]
    common = dict(kernel=kernel, head_dim=d, shared_memory=10**9, grouped=grouped)
    assert tiles not in _tiles(prune_configs(configs, dtype="bf16", arch=arch, **common))
    assert tiles in _tiles(prune_configs(configs, dtype="fp32", arch=arch, **common))
    other = next(a for a in LIMIT if a != arch)
    if tiles not in SPILLING_16BIT.get((kernel, other, d, grouped), set()):
        assert tiles in _tiles(prune_configs(configs, dtype="bf16", arch=other, **common))


def _gate_results() -> list[dict]:
    return [r for r in json.loads(GATE_JSON.read_text()) if r["variant"]["tuned"]]


def test_estimate_bounds_every_config_the_full_gate_measured():
    """The pruning's estimate is at least the shared memory of every autotuned variant in the
    full gate's results (both architectures, every dtype and head dim there)."""
    results = [r for r in _gate_results() if r["error"] is None]
    assert {r["arch"] for r in results} == {80, 90}
    for r in results:
        v, context = r["variant"], r["variant"]["contexts"][0]
        config = _config(*_variant_tiles(v))
        estimate = shared_memory_estimate(
            config, kernel=v["kernel"], dtype=context["dtype"], head_dim=context["head_dim"]
        )
        assert estimate >= r["shared"], (v["kernel"], context, _tiles([config]), r["shared"])


def test_no_kept_16bit_config_spills_in_the_full_gate():
    """Of the 16-bit variants the full gate compiled, those whose config the pruning keeps on
    their architecture and head layout spill nothing, and both layouts keep some."""
    candidates = {"_fwd_kernel": FWD_CONFIGS, "_dkdv_kernel": DKDV_CONFIGS}
    seen = set()
    for r in _gate_results():
        v, context = r["variant"], r["variant"]["contexts"][0]
        if context["dtype"] == "fp32" or r["error"] is not None:
            continue
        kept = prune_configs(
            [_config(*t) for t in candidates[v["kernel"]]], kernel=v["kernel"],
            dtype=context["dtype"], head_dim=context["head_dim"], shared_memory=LIMIT[r["arch"]],
            arch=r["arch"], grouped=context["heads"] != "mha",
        )  # fmt: skip
        tiles = _variant_tiles(v)
        if tiles in _tiles(kept):
            assert r["spilled"] == 0, (v["kernel"], r["arch"], context, tiles, r["spilled"])
            seen.add((v["kernel"], r["arch"], context["head_dim"], context["heads"]))
    assert {k for k, *_ in seen} == set(TUNED)
    assert {heads for *_, heads in seen} == {"mha", "gqa"}


# The child: for every launch of the main context (grouped-query, so G is not the constant 1)
# the gate's specialization and the one Triton's JIT computes in `JITFunction.run` (with the
# compile itself intercepted: no GPU), by argument name, and the launch's argument values.
_SPECIALIZATION = """
import json
from triton.runtime.jit import JITFunction
from bench import compile_gate as aot

seen = []
JITFunction._do_compile = lambda self, key, sig, device, constexprs, options, attrs, warmup: (
    seen.append((sig, constexprs, attrs)))
rows = []
for launch in aot.trace(aot.Context(**aot.MAIN, heads="gqa")):
    extra = aot._configs(launch, 90)[0]
    with aot.target(90):
        launch.fn.run(*launch.args, grid=(1,), warmup=True, **launch.kwargs, **extra)
    sig, constexprs, attrs = seen.pop()
    names = launch.fn.arg_names
    values = {
        name: ("pointer", arg.data_ptr()) if hasattr(arg, "data_ptr") else (type(arg).__name__, arg)
        for name, arg in zip(names, launch.args) if isinstance(arg, int) or hasattr(arg, "data_ptr")
    }
    rows.append(dict(
        kernel=launch.fn.__name__, gate=aot.specialize(launch, 90, extra)[:3], values=values,
        jit=[sig, {names[k[0]]: v for k, v in constexprs.items()},
             {names[k[0]]: v for k, v in attrs.items()}],
    ))
print(json.dumps(rows, default=str))
"""


def test_gate_specializes_as_tritons_jit():
    """The gate's signature, constexprs and attributes equal those Triton's JIT computes for the
    same arguments, and follow the aligned-input rule: tt.divisibility=16 on every pointer and
    every integer that is a multiple of 16, integers equal to 1 as constants."""
    done = subprocess.run(
        [sys.executable, "-c", _SPECIALIZATION], cwd=ROOT, env=COMPILING,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert {"_fwd_kernel", "_dkdv_kernel", "_scan_kernel"} <= {row["kernel"] for row in rows}
    for row in rows:
        assert row["gate"] == row["jit"], row["kernel"]
        _, constexprs, attrs = row["gate"]
        for name, (kind, value) in row["values"].items():
            if kind == "int" and value == 1:
                assert constexprs[name] == 1, (row["kernel"], name)
                continue
            aligned = value % 16 == 0
            assert (attrs[name] == [["tt.divisibility", 16]]) == aligned, (row["kernel"], name)
        assert any(kind == "pointer" for kind, _ in row["values"].values())


def _fused_forward_flags() -> set[tuple]:
    """The forward's flag combinations the schemes reach, counted from SCHEMES: the schemes the
    fused kernel serves (no decay, transport or forget gate; ALiBi or no bias) with and without
    packed documents, skipping only with ALiBi, IEEE (float32) and TF32 (16-bit) dots."""
    served = {
        (spec.rotation is not None, spec.rotate_values, spec.bias == "alibi", spec.window)
        for spec in SCHEMES.values()
        if not (spec.decay or spec.transport or spec.forget) and spec.bias in (None, "alibi")
    }
    return {
        (*flags, docs, skip, precision)
        for flags, docs, skip, precision in product(served, BOTH, BOTH, ("ieee", "tf32"))
        if flags[2] or not skip
    }


@pytest.fixture(scope="module")
def subset_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    command = [sys.executable, "-m", "bench.compile_gate", "--subset", "--workers", "2"]
    done = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, env=COMPILING, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert out.exists(), done.stdout[-3000:] + done.stderr[-2000:]
    return [{**r, "log": done.stdout[-3000:]} for r in json.loads(out.read_text())]


def test_subset_covers_every_flag_combination_the_schemes_reach(subset_results):
    """The suite's subset compiles each forward flag combination counted from SCHEMES, and
    every tile config the pruning keeps for the main combination on both architectures."""
    keys = ("ROTATE", "ROTATE_V", "ALIBI", "WINDOW", "DOCS", "SKIP", "PRECISION")
    compiled = {
        tuple(r["variant"]["flags"][k] for k in keys)
        for r in subset_results
        if r["variant"]["kernel"] == "_fwd_kernel"
    }
    assert compiled == _fused_forward_flags()
    main = {"scheme": "hybrid", "dtype": "bf16", "head_dim": 128, "docs": True, "skip": True}
    for arch, kernel in product(LIMIT, TUNED):
        tiles = {
            _variant_tiles(r["variant"])
            for r in subset_results
            if r["arch"] == arch and r["variant"]["kernel"] == kernel and r["variant"]["tuned"]
            and any(c.items() >= main.items() for c in r["variant"]["contexts"])
        }  # fmt: skip
        candidates = FWD_CONFIGS if kernel == "_fwd_kernel" else DKDV_CONFIGS
        kept = prune_configs(
            [_config(*t) for t in candidates], kernel=kernel, dtype="bf16", head_dim=128,
            shared_memory=LIMIT[arch], arch=arch,
        )  # fmt: skip
        assert tiles == _tiles(kept), (arch, kernel)


def test_every_subset_compilation_passes_the_gate(subset_results):
    """No compile error, shared memory within the target's limit and the pruning's estimate,
    no spills but in the float32 attention kernels, on both targets."""
    assert {r["arch"] for r in subset_results} == {80, 90}
    for r in subset_results:
        assert r["problem"] is None and r["shared"] <= LIMIT[r["arch"]], (r["problem"], r["log"])


def test_gpu_check_without_cuda_says_so_and_exits_cleanly(capsys):
    from bench.gpu_check import main

    assert main([]) == 0
    no_cuda = "no CUDA device: make gpu-check runs on a machine with a CUDA GPU\n"
    assert capsys.readouterr().out == no_cuda
