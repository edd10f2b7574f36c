"""Inputs to documents: paths, directories and globs to inputs; inputs to chunks of documents.

A plain text file is one document (its exact UTF-8 text); a `.jsonl` file (also `.jsonl.gz`,
`.jsonl.zst`) holds one document per non-blank line (a field of a JSON object); a `.parquet`
file one per row (a string column), and so does a directory written by `datasets`'
`Dataset.save_to_disk` (read with `datasets.load_from_disk`, in row order; an optional
dependency). An input is read as chunks of raw documents (`read_chunks`: file reading and
decompression, cheap) that `decode_chunk` turns into text (UTF-8 and JSON decoding, the errors
naming the file and line), so that the decoding can run in worker processes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import gzip
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from data.manifest import DatasetError

if TYPE_CHECKING:
    import pyarrow as pa

GLOB_CHARS = "*?["
KINDS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".parquet": "parquet",
}
SAVED_DATASET = ("state.json", "dataset_info.json")  # what Dataset.save_to_disk writes
DATASET_DICT = "dataset_dict.json"  # what DatasetDict.save_to_disk writes
TABLE_ROWS = 1024  # rows of a parquet file or saved dataset per chunk


@dataclass(frozen=True)
class Chunk:
    """Consecutive raw documents of one input: `data` is a text file's bytes (kind "text"),
    whole jsonl lines ("jsonl", the first of them line `start`) or the rows of a string column
    ("table", the first of them row `start`); `size` is the input bytes they were read from."""

    source: Path
    kind: str
    start: int
    data: bytes | pa.Array
    size: int

    @property
    def nbytes(self) -> int:
        """The bytes of text it holds (about)."""
        return len(self.data) if isinstance(self.data, bytes) else self.data.nbytes


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """The inputs, in order: each path as given, each directory walked recursively (hidden
    entries skipped, a saved dataset in it one input) and each glob expanded, sorted; an input
    named twice is kept once. DatasetError for any that is not a regular file or directory."""
    files: list[Path] = []
    for pattern in inputs:
        if any(c in pattern for c in GLOB_CHARS):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        elif os.path.lexists(pattern):  # a link in a loop, or to nothing, is named below
            matches = [Path(pattern)]
        else:
            raise DatasetError(f"input {pattern} does not exist")
        found = [f for m in matches for f in (_walk(m) if _check_type(m) == "dir" else [m])]
        for f in found:
            _check_type(f)
        saved = [f for f in found if f.is_dir()]  # a glob may match their files too: not inputs
        found = [f for f in found if f.is_dir() or not any(f.is_relative_to(d) for d in saved)]
        if not found:
            raise DatasetError(f"no files matched input {pattern}")
        files += found
    unique = {f.resolve(): f for f in reversed(files)}  # first occurrence wins
    return [f for f in files if unique.get(f.resolve()) is f]


FILE_TYPES = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _check_type(path: Path, mode: int | None = None) -> str:
    """What `path` is, following links: "file" or "dir"; DatasetError naming it if it is
    anything else (a FIFO, device or socket, which reading could wait on forever) or cannot be
    looked at (a link in a loop or to nothing). Nothing is opened."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DatasetError(
                    f"input {path}: a symbolic link loop ({e.strerror}); fix or leave it out"
                ) from None
            raise DatasetError(
                f"cannot read input {path}: {e.strerror}; fix or leave it out"
            ) from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    what = FILE_TYPES.get(stat.S_IFMT(mode), "not a regular file")
    raise DatasetError(
        f"input {path} is {what}, not a file; leave it out of --input (a glob such as "
        "'DIR/**/*.txt' picks files by name)"
    )


def _walk(directory: Path) -> list[Path]:
    """The files under `directory` and the saved datasets in it (directories), sorted (with
    the saved datasets' own files, which resolve_inputs leaves out)."""
    if _is_saved_dataset(directory):
        return [directory]
    return sorted(
        p
        for p in directory.rglob("*")
        if not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and (not p.is_dir() or _is_saved_dataset(p))
    )


def _is_saved_dataset(directory: Path) -> bool:
    """Whether `directory` holds a `Dataset.save_to_disk`; a DatasetDict's is an error (which of
    its splits to read is the user's choice)."""
    if (directory / DATASET_DICT).is_file():
        try:
            splits = json.loads((directory / DATASET_DICT).read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
        example = directory / splits[0] if splits else directory / "SPLIT"
        raise DatasetError(
            f"{directory} is a datasets DatasetDict (splits: {', '.join(splits)}); pass the "
            f"directory of the split to read, e.g. {example}"
        )
    return all((directory / name).is_file() for name in SAVED_DATASET)


def _saved_dataset_files(directory: Path) -> list[Path]:
    """The files `datasets.load_from_disk` reads: state.json, dataset_info.json and the data
    files state.json lists (not cache files that `map` may have left beside them)."""
    state = directory / SAVED_DATASET[0]
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{state} is not a datasets save_to_disk state ({e}); save the dataset again"
        ) from None
    return [directory / name for name in (*SAVED_DATASET, *names)]


def file_kind(file: Path) -> str:
    """How an input holds documents: "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "dataset" (a
    save_to_disk directory) or "text" (the whole file)."""
    if file.is_dir():
        return "dataset"
    return next((kind for suffix, kind in KINDS.items() if file.name.endswith(suffix)), "text")


def input_size(file: Path) -> int:
    """The bytes of an input (a saved dataset's data files)."""
    if file.is_dir():
        return sum(f.stat().st_size for f in _saved_dataset_files(file)[len(SAVED_DATASET) :])
    return file.stat().st_size


def file_digest(files: Sequence[Path]) -> str:
    """SHA-256 over the kind and bytes of every input, in order (a saved dataset: the name and
    bytes of each file it is read from): what a dataset was built from."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file_kind(file).encode())
        if file.is_dir():
            for part in _saved_dataset_files(file):
                digest.update(part.name.encode() + _sha256(part))
        else:
            digest.update(_sha256(file))
    return digest.hexdigest()


def _sha256(file: Path) -> bytes:
    with _open(file) as f:
        return hashlib.file_digest(f, "sha256").digest()


def read_chunks(file: Path, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """The documents of `file`, undecoded, in order, in chunks of about `chunk_bytes` or
    TABLE_ROWS rows (a text file is one chunk)."""
    kind = file_kind(file)
    if kind == "parquet":
        yield from _parquet_chunks(file, text_field)
    elif kind == "dataset":
        yield from _saved_dataset_chunks(file, text_field)
    elif kind == "text":
        with _open(file) as f:
            raw = f.read()
        yield Chunk(file, "text", 0, raw, len(raw))
    else:
        yield from _jsonl_chunks(file, kind, chunk_bytes)


def decode_chunk(chunk: Chunk, text_field: str) -> list[str]:
    """The documents of a chunk as text; DatasetError naming the file and line or row of a bad
    one."""
    if chunk.kind == "text":
        return [_decode(chunk.data, chunk.source)]
    if chunk.kind == "table":
        texts = chunk.data.to_pylist()
        if chunk.data.null_count:
            row = chunk.start + texts.index(None)
            raise DatasetError(f"{chunk.source} row {row}: column {text_field!r} is null")
        return texts
    return [
        _jsonl_text(raw, f"{chunk.source} line {number}", text_field)
        for number, raw in enumerate(chunk.data.split(b"\n"), start=chunk.start)
        if raw.strip()
    ]


def _open(file: Path) -> IO[bytes]:
    """`file` opened for reading, refused unless it is a regular file: opened without blocking
    (a FIFO that replaced the file since it was listed would wait for a writer), then checked."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _check_type(file)
        raise DatasetError(f"cannot read input {file}: {e.strerror}; fix or leave it out") from None
    try:
        if _check_type(file, os.fstat(fd).st_mode) == "dir":
            raise DatasetError(f"input {file} is a directory, not a file")
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(raw: bytes, where: object) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{where} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); "
            f"convert it to UTF-8 or leave it out of --input (a glob such as 'DIR/**/*.txt' "
            f"picks files by name)"
        ) from None


def _jsonl_chunks(file: Path, kind: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Whole lines of a (compressed) jsonl file, about `chunk_bytes` of them at a time."""
    with _open(file) as raw, _decompressed(raw, kind) as stream:
        line, read = 1, 0
        while True:
            try:
                data = stream.read(chunk_bytes)
                data += stream.readline()
            except Exception as e:  # gzip, zlib and zstandard raise assorted errors on bad bytes
                raise DatasetError(f"cannot read input {file} ({e}); fix or leave it out") from None
            if not data:
                return
            yield Chunk(file, "jsonl", line, data, raw.tell() - read)
            line += data.count(b"\n")
            read = raw.tell()


def _decompressed(raw: IO[bytes], kind: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    if kind == "jsonl.gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "jsonl.zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=False
        )
        return io.BufferedReader(reader)
    return contextlib.nullcontext(raw)


def _jsonl_text(raw: bytes, where: str, text_field: str) -> str:
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
    return text


def _parquet_chunks(file: Path, column: str) -> Iterator[Chunk]:
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
    rows, size = max(table.metadata.num_rows, 1), file.stat().st_size
    row = 0
    for batch in table.iter_batches(columns=[column], batch_size=TABLE_ROWS):
        yield _table_chunk(file, row, [batch.column(0)], size * batch.num_rows // rows)
        row += batch.num_rows


def _saved_dataset_chunks(directory: Path, column: str) -> Iterator[Chunk]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{directory} is a datasets save_to_disk directory: reading it needs the datasets "
            f"package (pip install datasets)"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(directory))
    except Exception as e:  # datasets and pyarrow raise assorted errors on damaged files
        raise DatasetError(f"cannot read saved dataset {directory}: {e}") from None
    if column not in dataset.column_names:
        names = ", ".join(dataset.column_names)
        raise DatasetError(
            f"{directory} has no column {column!r} (columns: {names}); pass --text-field"
        )
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DatasetError(f"{directory}: column {column!r} is not a string column")
    rows, size = max(len(dataset), 1), input_size(directory)
    batches = dataset.select_columns([column]).with_format("arrow").iter(batch_size=TABLE_ROWS)
    for row, batch in zip(range(0, len(dataset), TABLE_ROWS), batches, strict=True):
        yield _table_chunk(directory, row, batch.column(0).chunks, size * batch.num_rows // rows)


def _table_chunk(source: Path, row: int, arrays: list[pa.Array], size: int) -> Chunk:
    """A chunk of rows, copied out of the arrays they may be slices of (a pickled slice would
    carry its whole parent)."""
    import pyarrow as pa

    return Chunk(source, "table", row, pa.concat_arrays(arrays), size)
