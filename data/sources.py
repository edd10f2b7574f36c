"""Input files to documents: paths, directories and globs to files; files to documents.

A plain text file is one document (its exact UTF-8 text); a `.jsonl` file holds one document per
non-blank line (a field of a JSON object); a `.parquet` file one per row (a string column).
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from data.manifest import DatasetError

GLOB_CHARS = "*?["


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """The input files, in order: each path as given, each directory walked recursively (hidden
    entries skipped) and each glob expanded, sorted; a file named twice is kept once."""
    files: list[Path] = []
    for pattern in inputs:
        if any(c in pattern for c in GLOB_CHARS):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        elif Path(pattern).exists():
            matches = [Path(pattern)]
        else:
            raise DatasetError(f"input {pattern} does not exist")
        found = [f for m in matches for f in (_walk(m) if m.is_dir() else [m])]
        if not found:
            raise DatasetError(f"no files matched input {pattern}")
        files += found
    unique = {f.resolve(): f for f in reversed(files)}  # first occurrence wins
    return [f for f in files if unique.get(f.resolve()) is f]


def _walk(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if not p.is_dir()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def file_kind(file: Path) -> str:
    """How a file holds documents: "jsonl", "parquet" or "text" (the whole file)."""
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(file.suffix, "text")


def file_digest(files: Sequence[Path]) -> str:
    """SHA-256 over the kind and bytes of every file, in order: what a dataset was built from."""
    digest = hashlib.sha256()
    for file in files:
        with _open(file) as f:
            digest.update(file_kind(file).encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def read_documents(file: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """Each document of `file` with the number of input bytes it came from."""
    kind = file_kind(file)
    if kind == "jsonl":
        yield from _jsonl_documents(file, text_field)
    elif kind == "parquet":
        yield from _parquet_documents(file, text_field)
    else:
        with _open(file) as f:
            raw = f.read()
        yield _decode(raw, file), len(raw)


def _open(file: Path):
    try:
        return open(file, "rb")
    except OSError as e:
        raise DatasetError(f"cannot read input {file}: {e.strerror}; fix or leave it out") from None


def _decode(raw: bytes, where: object) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{where} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); "
            f"convert it to UTF-8 or leave it out of --input (a glob such as 'DIR/**/*.txt' "
            f"picks files by name)"
        ) from None


def _jsonl_documents(file: Path, text_field: str) -> Iterator[tuple[str, int]]:
    with _open(file) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{file} line {number}"
            try:
                record = json.loads(_decode(raw, where))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where} is not valid JSON: {e}") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DatasetError(
                    f"{where} has no field {text_field!r} (found: {keys}); pass --text-field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DatasetError(f"{where}: field {text_field!r} is not a string")
            yield text, len(raw)


def _parquet_documents(file: Path, column: str) -> Iterator[tuple[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file)
        names = table.schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"cannot read parquet input {file}: {e}") from None
    if column not in names:
        raise DatasetError(
            f"{file} has no column {column!r} (columns: {', '.join(names)}); pass --text-field"
        )
    kind = table.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DatasetError(f"{file}: column {column!r} is not a string column")
    rows = max(table.metadata.num_rows, 1)
    size = file.stat().st_size
    row = 0
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise DatasetError(f"{file} row {row}: column {column!r} is null")
            row += 1
            yield text, size // rows
