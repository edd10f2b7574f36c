"""`make generate` hands PROMPT to launch.generate byte for byte: neither make nor the shell
parses it (the real Makefile and make, with a stand-in for the venv's python)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")

# Records the arguments it is run with, NUL-separated, and does nothing else.
FAKE_PYTHON = '#!/bin/sh\nprintf \'%s\\0\' "$@" > "$ARGV_OUT"\n'

PROMPTS = [
    "x $(shell touch pwned) $5",
    "x $$(shell touch pwned) ${HOME} $(HOME) `touch pwned` $(touch pwned) ; touch pwned",
    'it\'s "quoted" # not a comment \\ back\\slash\\',
    "two\nlines\tand a tab, trailing blanks  ",
]


@pytest.fixture
def project(tmp_path) -> Path:
    """The Makefile in a directory whose venv is set up (its stamp newer than pyproject.toml),
    with a python that records its arguments."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    stamp = tmp_path / ".venv" / ".installed"
    stamp.touch()
    os.utime(tmp_path / "pyproject.toml", (0, 0))
    return tmp_path


def _generate(project: Path, *make_args: str, env: dict[str, str] | None = None) -> list[str]:
    out = project / "argv"
    out.unlink(missing_ok=True)
    # Nothing from an enclosing make (`make test`) or the caller's own PROMPT, RUN or ARGS.
    outer = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PROMPT", "RUN", "ARGS"}
    clean = {k: v for k, v in os.environ.items() if k not in outer}
    done = subprocess.run(
        ["make", "--no-print-directory", "generate", *make_args],
        cwd=project,
        env={**clean, **(env or {}), "ARGV_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return out.read_text().split("\0")[:-1]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_prompt_reaches_launch_generate_unchanged(project, prompt):
    argv = _generate(project, "RUN=runs/x", f"PROMPT={prompt}")
    assert argv == ["-m", "launch.generate", "runs/x", "--prompt", prompt]
    assert not (project / "pwned").exists()
    # Given in the environment, leading blanks included.
    argv = _generate(project, "RUN=runs/x", env={"PROMPT": "  " + prompt})
    assert argv == ["-m", "launch.generate", "runs/x", "--prompt", "  " + prompt]
    assert not (project / "pwned").exists()


def test_the_default_prompt(project):
    assert _generate(project)[2:] == ["runs/tiny", "--prompt", "def"]
