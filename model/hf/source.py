"""The modeling_rotalibi.py a Hugging Face export ships: one file importing only torch and
transformers, assembled from the repository's single copies of its parts.

model/hf/modeling_rotalibi.py imports its decoding core (model/decoding.py) and position tables
(model/positions.py); the shipped file holds those modules' code in place of the imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1]
# The inlined modules, in the order the shipped file defines them.
INLINED = (MODEL / "positions.py", MODEL / "decoding.py")
MODELING = Path(__file__).with_name("modeling_rotalibi.py")
FILE_NAME = MODELING.name


def _without_local_imports(path: Path) -> tuple[str | None, str]:
    """`path`'s docstring and its code without the docstring, `from __future__` and imports
    from this repository's `model` package."""
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    drop: set[int] = set()
    docstring = ast.get_docstring(tree, clean=False)
    for node in tree.body:
        local = isinstance(node, ast.ImportFrom) and (
            node.module == "__future__" or (node.module or "").split(".")[0] == "model"
        )
        is_doc = node is tree.body[0] and docstring is not None and isinstance(node, ast.Expr)
        if local or is_doc:
            drop.update(range(node.lineno - 1, node.end_lineno))
    return docstring, "".join(line for i, line in enumerate(lines) if i not in drop).strip()


def modeling_source() -> str:
    """The shipped modeling_rotalibi.py."""
    docstring, modeling = _without_local_imports(MODELING)
    parts = [f'"""{docstring}"""', "from __future__ import annotations"]
    for path in INLINED:
        _, code = _without_local_imports(path)
        parts += [f"# {'-' * 93}\n# {path.name} (inlined by the export)", code]
    parts += [f"# {'-' * 93}\n# {MODELING.name}", modeling]
    return "\n\n\n".join(parts) + "\n"


def write_modeling_file(out: Path) -> Path:
    """Write the shipped modeling_rotalibi.py into the export directory `out`."""
    target = out / FILE_NAME
    target.write_text(modeling_source())
    return target
