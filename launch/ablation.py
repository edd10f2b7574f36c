"""The ablation's report: `python -m launch.ablation [--summary FILE] [--out FILE]`.

`make ablation` runs it after the ablation's runs.

Reads the summary.json that `python -m launch.study configs/ablation --out docs/ablation` wrote
(default docs/ablation/summary.json) and writes docs/ablation.md: how the ablation was run, its
perplexity tables (mean ± spread over seeds), a link to the plot, and a verdict per question,
each a sentence computed from the summary's numbers. A question whose runs are not all in the
summary yet is answered "not measured yet (missing: ...)", so the report can be written at any
point of the ablation.

Noise, where a question compares against it: at a length, the largest seed spread (half the
range) among the schemes trained with three seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evaluation.ablation import render


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--summary", type=Path, default=Path("docs/ablation/summary.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/ablation.md"))
    args = parser.parse_args(argv)
    try:
        summary = json.loads(args.summary.read_text())
    except FileNotFoundError:
        print(
            f"error: {args.summary} does not exist; run `python -m launch.study configs/ablation "
            "--out docs/ablation` first",
            file=sys.stderr,
        )
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {args.summary}: {e}", file=sys.stderr)
        return 2
    if not isinstance(summary, dict) or not isinstance(summary.get("schemes", {}), dict):
        print(f"error: {args.summary} is not a launch.study summary", file=sys.stderr)
        return 2

    def link(name: str) -> str:
        """A file beside the summary, relative to the report."""
        target = (args.summary.parent / name).resolve()
        return Path(os.path.relpath(target, args.out.parent.resolve())).as_posix()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(summary, link("ppl_vs_length.png"), link("results.md")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
