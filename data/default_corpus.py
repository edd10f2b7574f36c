"""The default corpus (`make data`): the Python standard library's own source, no download.

Every `.py` file under the running interpreter's standard library directory
(`sysconfig.get_paths()["stdlib"]`), sorted by relative path, except third-party packages
(site-packages, dist-packages), the test suites (test, tests, idle_test), generated tables and
dumps (encodings, pydoc_data) and build-specific files (_sysconfigdata*). The corpus, so the
dataset, depends only on the interpreter's standard library sources: the same on every machine
with the same Python version from the same distribution (python.org/pyenv builds agree; a
distribution that patches the stdlib, e.g. Debian's, gives a slightly different corpus).
A default dataset built from another interpreter's stdlib (or by older rules) is rebuilt.

    python -m data.default_corpus [--output data/default]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from data.manifest import DatasetError
from data.prepare import prepare

DEFAULT_DATASET = "data/default"
VOCAB_SIZE = 2048  # configs/tiny.yaml's model.vocab_size
VAL_FRACTION = 0.1  # room for 8 held-out windows of 64 x 128 tokens
EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "__pycache__",
}


def default_corpus_files() -> list[Path]:
    """The standard library source files of the default corpus, in a machine-independent order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in stdlib.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(f.relative_to(stdlib).parts[:-1])
        and not f.name.startswith("_sysconfigdata")
    ]
    return sorted(files, key=lambda f: f.relative_to(stdlib).as_posix())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.default_corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default=DEFAULT_DATASET, help=f"default {DEFAULT_DATASET}")
    args = parser.parse_args(argv)
    files = default_corpus_files()
    if not files:
        print(
            f"error: no standard library sources under {sysconfig.get_paths()['stdlib']}",
            file=sys.stderr,
        )
        return 2
    try:
        prepare(
            [str(f) for f in files],
            args.output,
            vocab_size=VOCAB_SIZE,
            val_fraction=VAL_FRACTION,
            seed=0,
            overwrite=True,  # the default dataset is generated: replace an outdated one
        )
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
