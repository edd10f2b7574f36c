"""The layering as a checked contract (pyproject.toml's [tool.importlinter], docs/design.md):
imports run one way, launch > evaluation > training > model > data | kernels; no cycle crosses
packages or runs inside model/; launch/ holds entry points only, which no package imports; and
no file cites a path outside the repository."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = ("launch", "evaluation", "training", "model", "data", "kernels")
PACKAGES = (*LAYERS, "bench")
CONTRACTS = (
    "Layers: launch > evaluation > training > model > data | kernels",
    "data and kernels are independent",
    "No package imports bench",
)


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_contracts_are_kept():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for contract in CONTRACTS:
        assert f"{contract} KEPT" in done.stdout


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """The packages' Python files and pyproject.toml, copied (the contracts read only those)."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=_not_python)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _not_python(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith(".py") and not (Path(directory) / n).is_dir()]


@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("model/positions.py", "evaluation.results", CONTRACTS[0]),  # up two layers
        ("training/checkpoint.py", "launch.train", CONTRACTS[0]),  # an entry point
        ("data/manifest.py", "kernels.angles", CONTRACTS[1]),  # a sibling
        ("kernels/angles.py", "bench.attention_cost", CONTRACTS[2]),
    ],
)
def test_an_import_against_the_layers_fails_naming_it(package_copy, importer, imported, contract):
    path = package_copy / importer
    path.write_text(path.read_text() + f"\nimport {imported}  # noqa\n")
    done = _lint_imports(package_copy)
    assert done.returncode != 0
    assert f"{contract} BROKEN" in done.stdout
    module = importer.removesuffix(".py").replace("/", ".")
    assert f"{module} -> {imported}" in done.stdout, done.stdout


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_crosses_packages_or_runs_inside_model():
    cycles = _cycles(_graph())
    crossing = [c for c in cycles if len({m.split(".")[0] for m in c}) > 1]
    assert not crossing, crossing
    in_model = [c for c in cycles if any(m.split(".")[0] == "model" for m in c)]
    assert not in_model, in_model


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in [("model.a", "model.b"), ("model.b", "model.c"), ("model.c", "model.a")]:
        graph.add_import(importer=a, imported=b)
    graph.add_import(importer="model.c", imported="model.d")
    assert _cycles(graph) == [{"model.a", "model.b", "model.c"}]


def _has_main(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    defines = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    runs = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
    return defines and runs


def test_launch_holds_entry_points_only_and_no_package_imports_them():
    modules = sorted((ROOT / "launch").glob("*.py"))
    assert {p.stem for p in modules} >= {"train", "evaluate", "export", "generate", "slurm"}
    for path in modules:
        if path.name != "__init__.py":
            assert _has_main(path), f"{path.relative_to(ROOT)} is not an entry point (no main)"
    graph = _graph()
    for module in graph.find_children("launch"):
        importers = graph.find_modules_that_directly_import(module)
        outside = sorted(m for m in importers if not m.startswith("launch."))
        assert not outside, f"{module} is imported by {outside}"
    # bench/ imports the launch package itself, for the OpenMP wait policy its __init__ sets.
    assert graph.find_modules_that_directly_import("launch") <= {"bench"}


def test_no_file_cites_a_path_outside_the_repository():
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    this = Path(__file__).relative_to(ROOT).as_posix()
    outside = []
    for name in files:
        path = ROOT / name
        if (
            name == this
            or not path.is_file()
            or path.suffix not in {".py", ".md", ".sh", ".yaml", ".toml", ""}
        ):
            continue
        text = path.read_text(errors="replace")
        for needle in ("../shared", "DESIGN.md"):
            if needle in text:
                outside.append(f"{name}: {needle}")
    assert not outside, outside
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in (ROOT / "README.md").read_text()
