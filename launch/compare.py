"""Compare runs (schemes) by their newest evaluation: `python -m launch.compare RUN_DIR...`.

    python -m launch.compare runs/alibi runs/rope runs/hybrid [--out runs/compare]

Reads each run's newest `eval/step_<N>.json` (launch.evaluate) and writes `compare.png`
(perplexity against length, one curve per run, labelled by scheme) and `compare.md` (one row
per run: perplexity at every length, then beyond the trained length), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.compare import CompareError, compare


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/compare"), help="default: runs/compare"
    )
    args = parser.parse_args(argv)
    try:
        table = compare(args.runs, args.out)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"wrote {args.out / 'compare.png'} and {args.out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
