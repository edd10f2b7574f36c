"""What a GPU machine checks first, in one command: `make gpu-check` (`python -m bench.gpu_check`).

In under 8 minutes on one CUDA GPU, each part under its own time limit:

    kernels    tests/kernels/test_kernels_hybrid.py compiled: float32 against the float64 reference,
               the bfloat16/float16 tensor-core paths, memory linear in length
    attention  bench/attention.py at T = 8k, 16k, 32k, d = 128: fused kernel with and without
               ALiBi skipping, SDPA-flash, FlexAttention (FlashAttention-2 with ALiBi and with
               a window, and fla's PaTH, when installed)
    training   20 steps of configs/125m.yaml on the default corpus: the fused kernel inside
               DeepSpeed, tokens/s, MFU, peak memory, the loss going down

and one JSON with the device name, bench/results/gpu_check-<device>-<time>.json. Without CUDA it
says "no CUDA device" and exits 0: its script is what a lent GPU runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LIMITS_S = {"kernels": 190, "attention": 150, "training": 130}  # 470 s: within 8 minutes


def _run(part: str, command: list[str]) -> tuple[bool, str, float]:
    """(succeeded, the output's tail, seconds) of `command` under `part`'s time limit."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=LIMITS_S[part]
        )
        ok, tail = done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        ok, tail = False, f"timed out after {LIMITS_S[part]} s: {str(e.stdout or '')[-2000:]}"
    return ok, tail, time.perf_counter() - start


def kernels(work: Path) -> dict:
    report = work / "kernels.xml"
    ok, tail, seconds = _run(
        "kernels",
        [sys.executable, "-m", "pytest", "-q", "tests/kernels/test_kernels_hybrid.py",
         f"--junitxml={report}"],
    )  # fmt: skip
    cases = ElementTree.parse(report).getroot().iter("testcase") if report.exists() else []
    failed = [
        f"{case.get('name')}: {(case[0].get('message') or '')[:200]}"
        for case in cases
        if any(child.tag in ("failure", "error") for child in case)
    ]
    return {"ok": ok, "seconds": seconds, "failed": failed, "tail": "" if ok else tail}


def attention(work: Path) -> dict:
    out = work / "attention.json"
    ok, tail, seconds = _run(
        "attention",
        [sys.executable, "-m", "bench.attention", "--lengths", "8192", "16384", "32768",
         "--head-dims", "128", "--out", str(out)],
    )  # fmt: skip
    results = json.loads(out.read_text()) if ok else None
    return {"ok": ok, "seconds": seconds, "results": results, "tail": "" if ok else tail}


def training(work: Path) -> dict:
    dataset = ROOT / "data" / "default"
    ok, tail, _ = _run("training", [sys.executable, "-m", "data.default_corpus"])
    if not ok:
        return {"ok": False, "tail": tail}
    ok, tail, seconds = _run(
        "training",
        [sys.executable, "-m", "launch.train", "configs/125m.yaml", f"run.dir={work}",
         "run.name=gpu_check", f"data.path={dataset}", "train.max_steps=20",
         "train.warmup_steps=5", "train.log_every=1", "train.checkpoint_every=1000",
         "eval.every_checkpoint=false"],
    )  # fmt: skip
    metrics = work / "gpu_check" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if ok else []
    steps = [r for r in records if "loss" in r]
    summary = {
        "ok": ok and len(steps) == 20 and steps[-1]["loss"] < steps[0]["loss"],
        "seconds": seconds,
        "tail": "" if ok else tail,
    }
    if steps:
        later = steps[5:]  # past the autotuning of the first steps
        summary.update(
            loss_first=steps[0]["loss"],
            loss_last=steps[-1]["loss"],
            tokens_per_s=sum(r["tokens_per_s"] for r in later) / len(later),
            mfu=sum(r["mfu"] or 0 for r in later) / len(later),
            memory_gb=max(r["memory_gb"] for r in steps),
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: make gpu-check runs on a machine with a CUDA GPU")
        return 0
    device = torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "time": time.strftime("%FT%T")}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name, part in (("kernels", kernels), ("attention", attention), ("training", training)):
            print(f"{name}: running (at most {LIMITS_S[name]} s)", flush=True)
            report[name] = part(Path(tmp))
            print(f"{name}: {'ok' if report[name]['ok'] else 'FAILED'}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-")
    out = RESULTS / f"gpu_check-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if all(report[name]["ok"] for name in LIMITS_S) else 1


if __name__ == "__main__":
    sys.exit(main())
