"""What a GPU machine checks first, in one command: `make gpu-check` (`python -m bench.gpu_check`).

Within a total time budget (default 480 s; `--quick`: 230 s), every part under its own cap
and under what is left of the budget, in this order:

    kernels      tests/kernels/test_kernels_hybrid.py, sharded over parallel processes (one per
                 CPU core): Triton's compiles are warmed in parallel, and the compiled kernels
                 are checked against the float64 reference
    attention    bench/attention.py at T = 8k, 16k, 32k (quick: 8k), d = 128: the fused kernel
                 with and without skipping and its anchors (SDPA-flash, FlexAttention,
                 FlashAttention-2, fla's PaTH); an anchor that fails is a row with its error
    path         schemes path and path_alibi through `kernels.attention` against
                 `kernels.reference` in float64, in float32 and bfloat16
    corpus       the default corpus for the training parts (data.default_corpus)
    determinism  launch.train twice, 5 steps of configs/tiny.yaml with train.deterministic=true:
                 the saved weights and optimizer states compared bitwise
    training     20 steps of configs/125m.yaml (quick: 10): the fused kernel inside DeepSpeed,
                 tokens/s, MFU, peak memory, the loss going down

The autotuned kernels run one pinned tile config each (ROTALIBI_TILES), chosen from the compile
gate's results (bench/results/check_gpu_compile_vm.json) for the device's architecture: no
tuning runs and one compile per kernel and flag combination; `--autotune` tunes instead. The
JSON, bench/results/gpu_check-<device>-<time>.json, is rewritten after every part and the
attention benchmark's after every row (beside it), so a timeout or a kill keeps everything
measured before it. Without CUDA it says "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GATE_RESULTS = RESULTS / "check_gpu_compile_vm.json"
PIN_ENV = "ROTALIBI_TILES"  # read by kernels.hybrid.attention's autotune config lists
BUDGET_S = {"full": 480, "quick": 230}
# Each part's cap (full, quick); what is left of the total budget caps it further.
LIMITS_S = {
    "kernels": (170, 80),
    "attention": (130, 50),
    "path": (40, 25),
    "corpus": (40, 25),
    "determinism": (80, 60),
    "training": (120, 60),
}
MIN_PART_S = 5  # a part with less time left than this is skipped, not started

# (commands run side by side, seconds allowed) -> each command's (exit status, output); raises
# subprocess.TimeoutExpired when they run past the time allowed.
Runner = Callable[[list[list[str]], float, dict[str, str]], list[tuple[int, str]]]


def run_commands(commands: list[list[str]], timeout: float, env: dict) -> list[tuple[int, str]]:
    """Run `commands` side by side in the repository, each with its output captured; all are
    killed when `timeout` seconds have passed."""
    with contextlib.ExitStack() as files:
        outputs = [files.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in commands]
        processes = [
            subprocess.Popen(c, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
            for c, out in zip(commands, outputs, strict=True)
        ]
        deadline = time.monotonic() + timeout
        try:
            for process in processes:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as expired:
            for process in processes:
                process.kill()
                process.wait()
            outputs[0].seek(0)
            raise subprocess.TimeoutExpired(commands[0], timeout, outputs[0].read()) from expired
        results = []
        for process, out in zip(processes, outputs, strict=True):
            out.seek(0)
            results.append((process.returncode, out.read()))
    return results


@dataclass
class Check:
    """One gpu-check run: the parts' results, the budget and where the JSON goes."""

    out: Path
    quick: bool
    work: Path
    runner: Runner = run_commands
    clock: Callable[[], float] = time.monotonic
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.budget = BUDGET_S["quick" if self.quick else "full"]
        self.start = self.clock()

    def left(self) -> float:
        return self.budget - (self.clock() - self.start)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=2))

    def run(self, part: str, commands: list[list[str]]) -> dict:
        """Run `commands` side by side under `part`'s cap and the budget left: {"ok", "seconds",
        "tail" (on failure), "timed_out"} and each command's output under "outputs"."""
        allowed = min(LIMITS_S[part][self.quick], self.left())
        if allowed < MIN_PART_S:
            return {"ok": False, "skipped": f"{self.left():.0f} s left of the budget"}
        started = self.clock()
        try:
            done = self.runner(commands, allowed, self.env)
        except subprocess.TimeoutExpired as e:
            output = e.output if isinstance(e.output, str) else (e.output or b"").decode()
            return {
                "ok": False, "timed_out": True, "seconds": self.clock() - started,
                "tail": f"timed out after {allowed:.0f} s: {output[-2000:]}", "outputs": [],
            }  # fmt: skip
        ok = all(status == 0 for status, _ in done)
        tail = "" if ok else "\n".join(output[-3000:] for status, output in done if status)
        return {
            "ok": ok, "timed_out": False, "seconds": self.clock() - started, "tail": tail,
            "outputs": [output for _, output in done],
        }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Pinned tiles
# ----------------------------------------------------------------------------------------------


def pinned_tiles(gate: list[dict], arch: int) -> dict[str, list[int]]:
    """Per autotuned kernel, [BLOCK_M, BLOCK_N, warps, stages] of the largest tiles that passed
    the compile gate on sm_`arch` without spilling, for bfloat16 at d = 128 without grouped
    heads (the main combination); kernels with none are left to the autotuner."""
    best: dict[str, tuple] = {}
    for result in gate:
        variant = result["variant"]
        context = variant["contexts"][0]
        usable = (
            result["arch"] == arch and variant["tuned"] and result["problem"] is None
            and result["spilled"] == 0 and context["dtype"] == "bf16"
            and context["head_dim"] == 128 and context["heads"] == "mha"
        )  # fmt: skip
        if not usable:
            continue
        tiles, options = variant["constexprs"], variant["options"]
        config = [tiles["BLOCK_M"], tiles["BLOCK_N"], options["num_warps"], options["num_stages"]]
        rank = (config[0] * config[1], config[2], -config[3])
        if variant["kernel"] not in best or rank > best[variant["kernel"]][0]:
            best[variant["kernel"]] = (rank, config)
    return {kernel: config for kernel, (_, config) in sorted(best.items())}


def device_arch(capability: tuple[int, int], archs: list[int]) -> int:
    """The gate's architecture for a device: the newest one at or below its capability."""
    own = capability[0] * 10 + capability[1]
    return max((a for a in archs if a <= own), default=min(archs))


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------

KERNEL_TESTS = "tests/kernels/test_kernels_hybrid.py"


def kernels(check: Check) -> dict:
    """The kernel tests, their cases dealt round-robin to one pytest process per CPU core."""
    collected = check.run("kernels", [[sys.executable, "-m", "pytest", "-q", "--collect-only",
                                       KERNEL_TESTS]])  # fmt: skip
    if not collected["ok"]:
        return collected
    cases = [line for line in collected["outputs"][0].splitlines() if "::" in line]
    if not cases:
        return {**collected, "ok": False, "outputs": None, "tail": "no test case collected"}
    shards = max(1, min(os.cpu_count() or 1, len(cases)))
    reports = [check.work / f"kernels-{i}.xml" for i in range(shards)]
    commands = [
        [sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *cases[i::shards]]
        for i, report in enumerate(reports)
    ]
    result = check.run("kernels", commands)
    result.pop("outputs", None)
    failed = []
    for report in reports:
        if report.exists():
            for case in ElementTree.parse(report).getroot().iter("testcase"):
                for child in case:
                    if child.tag in ("failure", "error"):
                        failed.append(f"{case.get('name')}: {(child.get('message') or '')[:200]}")
    return {**result, "cases": len(cases), "processes": shards, "failed": failed}


def attention(check: Check) -> dict:
    """bench.attention; its JSON (rewritten after every row) is read back even on a timeout."""
    out = check.out.with_name(check.out.stem + "-attention.json")
    lengths = ["8192"] if check.quick else ["8192", "16384", "32768"]
    command = [sys.executable, "-m", "bench.attention", "--lengths", *lengths,
               "--head-dims", "128", "--out", str(out)]  # fmt: skip
    if check.quick:
        command += ["--rep-ms", "50"]
    result = check.run("attention", [command])
    result.pop("outputs", None)
    measured = json.loads(out.read_text()) if out.exists() else {}
    return {**result, "results": measured.get("results", []), "skipped": measured.get("skipped")}


def path(check: Check) -> dict:
    """`path_check` in its own process: one row per scheme, dtype and head dim."""
    result = check.run("path", [[sys.executable, "-m", "bench.gpu_check", "--path-check"]])
    rows = []
    for output in result.pop("outputs", []):
        rows += [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    ok = result["ok"] and bool(rows) and all(row.get("ok") for row in rows)
    return {**result, "ok": ok, "rows": rows}


def corpus(check: Check) -> dict:
    result = check.run("corpus", [[sys.executable, "-m", "data.default_corpus"]])
    result.pop("outputs", None)
    return result


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by its path."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if not isinstance(value, dict | list | tuple):
        return {}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    found = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}/{key}"))
    return found


def checkpoints_equal(first: Path, second: Path) -> tuple[bool, list[str]]:
    """Whether the model and optimizer states under two run folders are bitwise equal, and
    the tensors that differ (or the files one run lacks)."""
    names = ("*model_states.pt", "*optim_states.pt")
    files = sorted(p.relative_to(first) for n in names for p in first.rglob(n))
    if not files:
        return False, ["no checkpoint saved"]
    differing = []
    for relative in files:
        if not (second / relative).exists():
            differing.append(f"{relative}: missing in the second run")
            continue
        a = _tensors(torch.load(first / relative, map_location="cpu", weights_only=False))
        b = _tensors(torch.load(second / relative, map_location="cpu", weights_only=False))
        for key in sorted(a.keys() | b.keys()):
            same = key in a and key in b and a[key].dtype == b[key].dtype
            same = same and a[key].shape == b[key].shape and bool((a[key] == b[key]).all())
            if not same:
                differing.append(f"{relative}{key}")
    return not differing, differing[:20]


def determinism(check: Check) -> dict:
    """5 deterministic steps twice (side by side); their checkpoints compared bitwise."""
    dataset = ROOT / "data" / "default"
    runs = [check.work / "determinism" / name for name in ("first", "second")]
    commands = [
        [sys.executable, "-m", "launch.train", "configs/tiny.yaml", f"run.dir={run.parent}",
         f"run.name={run.name}", f"data.path={dataset}", "train.max_steps=5",
         "train.warmup_steps=2", "train.checkpoint_every=5", "train.deterministic=true",
         "eval.every_checkpoint=false"]
        for run in runs
    ]  # fmt: skip
    result = check.run("determinism", commands)
    result.pop("outputs", None)
    if not result["ok"]:
        return result
    equal, differing = checkpoints_equal(*runs)
    return {**result, "ok": equal, "bitwise_equal": equal, "differing": differing}


def training(check: Check) -> dict:
    steps = 10 if check.quick else 20
    run = check.work / "training"
    result = check.run(
        "training",
        [[sys.executable, "-m", "launch.train", "configs/125m.yaml", f"run.dir={run.parent}",
          f"run.name={run.name}", f"data.path={ROOT / 'data' / 'default'}",
          f"train.max_steps={steps}", "train.warmup_steps=5", "train.log_every=1",
          "train.checkpoint_every=1000", "eval.every_checkpoint=false"]],
    )  # fmt: skip
    result.pop("outputs", None)
    metrics = run / "metrics.jsonl"
    records = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    )
    losses = [r for r in records if "loss" in r]
    result["ok"] = result["ok"] and len(losses) == steps and losses[-1]["loss"] < losses[0]["loss"]
    if losses:
        later = losses[5:] or losses  # past the first steps' compiles
        result.update(
            loss_first=losses[0]["loss"],
            loss_last=losses[-1]["loss"],
            tokens_per_s=sum(r["tokens_per_s"] for r in later) / len(later),
            mfu=sum(r["mfu"] or 0 for r in later) / len(later),
            memory_gb=max(r["memory_gb"] for r in losses),
        )
    return result


PARTS = {
    "kernels": kernels,
    "attention": attention,
    "path": path,
    "corpus": corpus,
    "determinism": determinism,
    "training": training,
}


def run_parts(check: Check, parts: dict[str, Callable[[Check], dict]] = PARTS) -> bool:
    """Every part in order, the JSON rewritten after each; whether all passed."""
    for name, part in parts.items():
        print(f"{name}: running ({min(LIMITS_S[name][check.quick], check.left()):.0f} s at most)",
              flush=True)  # fmt: skip
        if name == "determinism" and not check.report.get("corpus", {}).get("ok", True):
            check.report[name] = {"ok": False, "skipped": "no corpus"}
        else:
            check.report[name] = part(check)
        check.save()
        print(f"{name}: {'ok' if check.report[name]['ok'] else 'FAILED'}", flush=True)
    return all(check.report[name]["ok"] for name in parts)


# ----------------------------------------------------------------------------------------------
# PaTH through kernels.attention against the reference
# ----------------------------------------------------------------------------------------------

PATH_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def path_check(device: str = "cuda") -> list[dict]:
    """Schemes path and path_alibi: `kernels.attention` (PaTH transport, ALiBi as its bias)
    against `kernels.reference.reference_attention` in float64; the relative max error of the
    output per dtype and head dim."""
    import torch.nn.functional as F

    import kernels
    from kernels.reference import reference_attention
    from model.positions import alibi_slopes

    rows = []
    B, T, H = 2, 256, 4
    for scheme in ("path", "path_alibi"):
        for head_dim in (64, 128):
            for dtype in PATH_TOLERANCE:
                row = {"scheme": scheme, "dtype": str(dtype).removeprefix("torch."), "d": head_dim}
                try:
                    gen = torch.Generator().manual_seed(0)
                    q, k, v = (torch.randn(B, T, H, head_dim, generator=gen) for _ in range(3))
                    w = F.normalize(torch.randn(B, T, H, head_dim, generator=gen), dim=-1)
                    beta = 2 * torch.rand(B, T, H, generator=gen)
                    bias = None
                    if scheme == "path_alibi":
                        slopes = alibi_slopes(H).double()
                        table = -slopes[:, None] * torch.arange(T, dtype=torch.float64)
                        bias = (table, slopes)
                    exact = reference_attention(q.double(), k.double(), v.double(),
                                                transport=(w.double(), beta.double()),
                                                bias=None if bias is None else bias[0])  # fmt: skip
                    cast = [x.to(device, dtype) for x in (q, k, v, w, beta)]
                    table = None
                    if bias is not None:
                        table = kernels.AlibiTable.wrap(
                            bias[0].to(device, dtype), bias[1].to(device, dtype)
                        )
                    out = kernels.attention(*cast[:3], transport=(cast[3], cast[4]), bias=table)
                    error = ((out.double().cpu() - exact).abs().max() / exact.abs().max()).item()
                    row.update(
                        error=error, ok=math.isfinite(error) and error <= PATH_TOLERANCE[dtype]
                    )
                except Exception as e:  # a row with its error, never the end of the check
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"within {BUDGET_S['quick']} s")
    parser.add_argument("--autotune", action="store_true", help="tune tiles, do not pin them")
    parser.add_argument("--path-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: make gpu-check runs on a machine with a CUDA GPU")
        return 0
    if args.path_check:
        for row in path_check():
            print(json.dumps(row), flush=True)
        return 0
    device = torch.cuda.get_device_name()
    budget = BUDGET_S["quick" if args.quick else "full"]
    report = {"device": device, "torch": torch.__version__, "time": time.strftime("%FT%T"),
              "quick": args.quick, "budget_s": budget}  # fmt: skip
    env = dict(os.environ)
    if not args.autotune and GATE_RESULTS.exists():
        gate = json.loads(GATE_RESULTS.read_text())
        arch = device_arch(torch.cuda.get_device_capability(), sorted({r["arch"] for r in gate}))
        tiles = pinned_tiles(gate, arch)
        env[PIN_ENV] = json.dumps(tiles)
        report["pinned_tiles"] = {"arch": arch, **tiles}
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-")
    out = RESULTS / f"gpu_check-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        check = Check(out, args.quick, Path(tmp), env=env, report=report)
        check.save()
        ok = run_parts(check)
    report["seconds"] = time.monotonic() - check.start
    check.save()
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
