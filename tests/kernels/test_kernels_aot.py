"""The GPU kernels compile for real targets on this GPU-less machine (kernels.hybrid.aot), the
autotuner's configs that would not fit a GPU's shared memory are pruned, and the GPU check
(`make gpu-check`) says what it needs here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import triton
from conftest import ROOT

from kernels.hybrid.attention import prune_configs, shared_memory_estimate

A100, H100 = 166_912, 232_448  # shared memory per block: sm_80, sm_90
TUNED = ("_dkdv_kernel", "_fwd_kernel")  # the autotuned attention kernels


def _tiles(configs: list[triton.Config]) -> set[tuple[int, int, int, int]]:
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}


@pytest.mark.parametrize("limit", [A100, H100])
@pytest.mark.parametrize("kernel", TUNED)
def test_configs_that_do_not_fit_are_pruned(kernel, limit):
    """Every config kept fits (by the estimate the compile gate checks against the compiled
    kernels); float32 at d = 128 loses its largest tiles, a deliberately oversized config is
    dropped, and when nothing fits the smallest config is left for the compile to judge."""
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in [(16, 16, 4, 2), (64, 64, 4, 3), (128, 128, 8, 3), (512, 512, 8, 4)]
    ]
    for dtype in ("fp32", "bf16"):
        kept = prune_configs(configs, kernel=kernel, dtype=dtype, head_dim=128, shared_memory=limit)
        sizes = [shared_memory_estimate(c, kernel=kernel, dtype=dtype, head_dim=128) for c in kept]
        assert all(size <= limit for size in sizes) and sizes == sorted(sizes, reverse=True)
        assert (512, 512, 8, 4) not in _tiles(kept) and (16, 16, 4, 2) in _tiles(kept)
    fp32 = dict(kernel=kernel, dtype="fp32", head_dim=128)
    assert (128, 128, 8, 3) not in _tiles(prune_configs(configs, **fp32, shared_memory=limit))
    assert _tiles(prune_configs(configs, **fp32, shared_memory=1)) == {(16, 16, 4, 2)}


def test_every_kernel_compiles_for_sm80_and_sm90_within_the_gate(tmp_path):
    """A representative subset (every kernel, bfloat16, d = 128, the largest tiles kept) down
    to ptxas for both targets: no compile error, shared memory within the target's limit and
    at most the estimate the pruning uses, no spills in the elementwise kernels and the scan."""
    out = tmp_path / "aot.json"
    command = [sys.executable, "-m", "kernels.hybrid.aot", "--subset", "--workers", "2"]
    done = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    compiled = {(r["variant"]["kernel"], r["arch"]) for r in results}
    kernels = {*TUNED, "_rotate_kernel", "_row_dot_kernel", "_unrotate_kernel", "_scan_kernel"}
    assert compiled == {(kernel, arch) for kernel in kernels for arch in (80, 90)}
    for r in results:  # problem: also shared memory above the estimate the pruning uses
        assert r["problem"] is None and r["shared"] <= {80: A100, 90: H100}[r["arch"]], r


def test_gpu_check_without_cuda_says_so_and_exits_cleanly(capsys):
    from bench.gpu_check import main

    assert main([]) == 0
    no_cuda = "no CUDA device: make gpu-check runs on a machine with a CUDA GPU\n"
    assert capsys.readouterr().out == no_cuda
