"""`make gpu-check` keeps what it measured: with a fake runner and clock, a part that times out
leaves every earlier row in its JSON, the total budget holds, and a failing anchor of the
attention benchmark is a row with its error; the pinned tiles come from the gate's results."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import attention as bench_attention
from bench import gpu_check
from bench.gpu_check import LIMITS_S, Check, device_arch, pinned_tiles, run_parts


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Each call takes `seconds[part]` on the fake clock (the part: a word of its first command,
    e.g. the module it runs); over the time allowed it raises TimeoutExpired at the deadline.
    `effects[part]` runs first (e.g. writes a partial benchmark JSON). `calls` records each
    call's part, time allowed and deadline (since the fake clock's start)."""

    def __init__(self, clock: FakeClock, seconds: dict[str, float], effects=None) -> None:
        self.clock, self.seconds, self.effects = clock, seconds, effects or {}
        self.calls: list[tuple[str, float, float]] = []

    def __call__(self, commands, timeout, env):
        part = next(p for p in self.seconds if p in commands[0])
        self.calls.append((part, timeout, self.clock.now - 1000.0 + timeout))
        if part in self.effects:
            self.effects[part](commands)
        if self.seconds[part] > timeout:
            self.clock.now += timeout
            raise subprocess.TimeoutExpired(commands[0], timeout, output="partial output")
        self.clock.now += self.seconds[part]
        return [(0, "tests/kernels/test_kernels_hybrid.py::test_one\n") for _ in commands]


def _parts(names: list[str]) -> dict:
    """Stand-in parts: each runs one command naming it (the runner's key)."""

    def part(name):
        return lambda check: {k: v for k, v in check.run(name, [["run", name]]).items()
                              if k != "outputs"}  # fmt: skip

    return {name: part(name) for name in names}


def _check(tmp_path: Path, runner: FakeRunner, clock: FakeClock, quick=False) -> Check:
    return Check(tmp_path / "report.json", quick, tmp_path, runner=runner, clock=clock)


def test_a_part_that_times_out_leaves_every_earlier_row_in_the_json(tmp_path):
    """The attention part times out after writing two rows: the JSON on disk holds the parts
    before it, its two rows and its timeout, and the parts after it ran."""
    clock = FakeClock()
    out = tmp_path / "report-attention.json"

    def two_rows(commands):
        rows = [{"method": "hybrid", "T": 8192, "fwd_ms": 1.0}, {"method": "sdpa_flash", "T": 8192}]
        out.write_text(json.dumps({"results": rows, "skipped": {}}))

    runner = FakeRunner(
        clock, {"pytest": 30, "bench.attention": 10**6, "path": 5}, {"bench.attention": two_rows}
    )
    check = _check(tmp_path, runner, clock)
    parts = {"kernels": gpu_check.kernels, "attention": gpu_check.attention,
             **_parts(["path"])}  # fmt: skip
    assert not run_parts(check, parts)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["kernels"]["ok"] and saved["kernels"]["processes"] >= 1
    assert saved["attention"]["timed_out"] and not saved["attention"]["ok"]
    assert [r["method"] for r in saved["attention"]["results"]] == ["hybrid", "sdpa_flash"]
    assert saved["path"]["ok"]
    assert [part for part, _, _ in runner.calls] == ["pytest", "pytest", "bench.attention", "path"]


@pytest.mark.parametrize("quick", [False, True])
def test_the_total_budget_holds_parts_included(tmp_path, quick):
    """Parts that each stay within their own cap but together overrun the budget: each is
    allowed at most what is left, the one that would overrun is stopped at the budget, the
    ones after it are skipped, not started, and the run ends within the budget."""
    clock = FakeClock()
    names = ["kernels", "attention", "path", "corpus", "training", "determinism"]
    seconds = {name: LIMITS_S[name][quick] - 1 for name in names}
    runner = FakeRunner(clock, seconds)
    check = _check(tmp_path, runner, clock, quick=quick)
    assert sum(seconds.values()) > check.budget  # the budget, not the caps, binds
    run_parts(check, _parts(names))
    assert clock.now - 1000.0 <= check.budget
    assert all(deadline <= check.budget for _, _, deadline in runner.calls)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert all(saved[name]["ok"] for name in names[:4])
    assert saved["training"]["timed_out"] and "skipped" in saved["determinism"]
    assert [part for part, _, _ in runner.calls] == names[:5]


def _bench_args(**overrides) -> argparse.Namespace:
    defaults = dict(lengths=[256], head_dims=[64], width=128, tokens=512, rep_ms=1,
                    methods=["hybrid", "fla_path", "sdpa_flash"])  # fmt: skip
    return argparse.Namespace(**{**defaults, **overrides})


def test_an_anchor_raising_assertion_error_becomes_a_row_with_its_error(tmp_path, monkeypatch):
    """fla's PaTH asserting on the head dim is that method's row, the methods after it still
    run, and the JSON on disk has every row once each is measured."""
    monkeypatch.setattr(bench_attention, "_available", lambda method: None)
    written: list[int] = []
    out = tmp_path / "attention.json"

    def measure(run, leaves):
        written.append(len(json.loads(out.read_text())["results"]) if out.exists() else 0)
        out_value = run()
        return {
            "fwd_ms": 1.0,
            "bwd_ms": 2.0,
            "fwd_bwd_ms": 3.0,
            "peak_mib": float(out_value.numel()),
        }

    def fla_path(x):
        def run():
            raise AssertionError("head_dim must be in {16, 32, 64}")

        return run, []

    def plain(x):
        return (lambda: x["q"].sum()), []

    builders = {"hybrid": plain, "fla_path": fla_path, "sdpa_flash": plain}
    report = bench_attention.run_benchmark(
        _bench_args(), out, builders=builders, measure=measure,
        make_inputs=lambda b, t, h, d: {"q": torch.ones(b, t, h, d)},
    )  # fmt: skip
    rows = report["results"]
    assert [r["method"] for r in rows] == ["hybrid", "fla_path", "sdpa_flash"]
    assert rows[1]["error"] == "AssertionError: head_dim must be in {16, 32, 64}"
    assert rows[0]["fwd_ms"] == 1.0 and rows[2]["fwd_ms"] == 1.0 and "error" not in rows[2]
    assert written == [0, 1, 2]  # the JSON had every earlier row before each measurement
    assert json.loads(out.read_text())["results"] == rows


def _gate_row(
    arch, kernel, tiles, *, problem=None, spilled=0, dtype="bf16", head_dim=128, heads="mha"
):
    m, n, w, s = tiles
    context = {"scheme": "hybrid", "dtype": dtype, "head_dim": head_dim, "heads": heads}
    variant = {"kernel": kernel, "tuned": True, "constexprs": {"BLOCK_M": m, "BLOCK_N": n},
               "options": {"num_warps": w, "num_stages": s}, "contexts": [context]}  # fmt: skip
    return {"arch": arch, "variant": variant, "problem": problem, "spilled": spilled}


def test_pinned_tiles_are_the_largest_that_pass_the_gate_without_spilling():
    gate = [
        _gate_row(90, "_fwd_kernel", (128, 128, 8, 3), spilled=120),
        _gate_row(90, "_fwd_kernel", (128, 64, 8, 3)),
        _gate_row(90, "_fwd_kernel", (64, 64, 4, 3)),
        _gate_row(90, "_fwd_kernel", (256, 64, 8, 3), problem="too much shared memory"),
        _gate_row(90, "_fwd_kernel", (128, 128, 8, 3), dtype="fp32"),
        _gate_row(80, "_fwd_kernel", (128, 128, 8, 3)),
        _gate_row(90, "_dkdv_kernel", (32, 128, 8, 3)),
        _gate_row(90, "_dkdv_kernel", (64, 128, 8, 3), head_dim=64),
        _gate_row(90, "_dkdv_kernel", (64, 128, 8, 3), heads="gqa"),
    ]
    assert pinned_tiles(gate, 90) == {
        "_dkdv_kernel": [32, 128, 8, 3],
        "_fwd_kernel": [128, 64, 8, 3],
    }
    assert device_arch((9, 0), [80, 90]) == 90 and device_arch((8, 9), [80, 90]) == 80
    assert device_arch((12, 0), [80, 90]) == 90


def test_pinned_tiles_reach_the_autotuner_through_the_environment(monkeypatch):
    """ROTALIBI_TILES replaces a kernel's candidates with the one config it pins."""
    from kernels.hybrid import attention

    monkeypatch.setenv(gpu_check.PIN_ENV, json.dumps({"_fwd_kernel": [64, 32, 4, 2]}))
    assert attention._candidates("_fwd_kernel", attention.FWD_CONFIGS) == [(64, 32, 4, 2)]
    assert attention._candidates("_dkdv_kernel", attention.DKDV_CONFIGS) == attention.DKDV_CONFIGS


def test_checkpoints_compare_bitwise(tmp_path):
    """Equal states are equal; one flipped last bit of one weight is found and named."""
    weights = {"module": {"w": torch.randn(4, 4), "b": torch.zeros(4)}, "step": 5}
    for name in ("first", "second"):
        (tmp_path / name / "step_5").mkdir(parents=True)
        torch.save(weights, tmp_path / name / "step_5" / "mp_rank_00_model_states.pt")
    assert gpu_check.checkpoints_equal(tmp_path / "first", tmp_path / "second") == (True, [])
    changed = {"module": {**weights["module"]}, "step": 5}
    w = changed["module"]["w"].clone()
    w.view(torch.int32)[0, 0] ^= 1
    changed["module"]["w"] = w
    torch.save(changed, tmp_path / "second" / "step_5" / "mp_rank_00_model_states.pt")
    equal, differing = gpu_check.checkpoints_equal(tmp_path / "first", tmp_path / "second")
    assert not equal and differing == ["step_5/mp_rank_00_model_states.pt/module/w"]
