"""Reading a corpus: the files an input names (directories recursively), and the documents in each (a text
file is one, a JSONL line or parquet row another), with a damaged file named. `slm prepare` and `slm eval`
read their inputs through it."""

from __future__ import annotations

import codecs
import errno
import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from slm.errors import SlmError


class DataError(SlmError):
    """The corpus or a prepared data directory cannot be used."""


TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUPPORTED:
        if name.endswith(suffix):
            return suffix
    return None


def missing_reason(path: Path) -> str:
    """Why a symbolic link cannot be opened: it points to nothing, or to a loop of links."""
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "a loop of symbolic links"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of symbolic links"
    return f"a symbolic link to {os.readlink(path)}, which does not exist"


def list_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand inputs (files and directories, recursively) to the readable corpus files, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input {path}: {missing_reason(path)}" if path.is_symlink() else
                            f"input not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise DataError(f"directory {path} has no readable text ({', '.join(SUPPORTED)} files)")
            files.extend(found)
        elif _kind(path):
            files.append(path)
        else:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED)}")
    if not files:
        raise DataError("no input files given")
    return files


MAX_INVALID_UTF8 = 0.001  # share of a text file's bytes that may be invalid UTF-8 (replaced, with a warning)
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def nul_reason(data: bytes, path: Path) -> str:
    """Why text with NUL bytes is refused: UTF-16 (a byte-order mark, or every other byte NUL), else binary."""
    head = data[:4096]
    if head.startswith(UTF16_BOMS) or head[1::2].count(0) > 0.9 * len(head[1::2]) or \
            head[0::2].count(0) > 0.9 * len(head[0::2]):
        return (f"UTF-16 text, and slm reads UTF-8; convert it first, e.g. iconv -f utf-16 -t utf-8 {path.name} > "
                f"{path.stem}.utf8{path.suffix}")
    return "not a text file (it contains NUL bytes); give .txt/.md files of UTF-8 text"


def read_text_file(path: Path) -> str:
    """A text file's contents. Refused when it is not text (NUL bytes, or more than 0.1% of its bytes
    invalid UTF-8); a few invalid bytes (a stray Latin-1 character) are replaced by U+FFFD with a warning."""
    data = path.read_bytes()
    if b"\x00" in data or data.startswith(UTF16_BOMS):
        raise DataError(f"{path}: {nul_reason(data, path)}")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark at the start is not text
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.count("\ufffd".encode())
    if replaced > MAX_INVALID_UTF8 * len(data):
        raise DataError(f"{path}: not UTF-8 text ({replaced:,} invalid bytes in {len(data):,}); convert it first, "
                        f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}")
    print(f"warning: {path}: {replaced:,} invalid UTF-8 byte(s) replaced by U+FFFD", file=sys.stderr)
    return text


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a .jsonl or .jsonl.gz file's non-blank lines; a damaged or truncated gzip file
    is reported with the line it reached."""
    lineno = 0
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 (read after the loop, in the error)
                if line.strip():
                    yield lineno, line
    except GZIP_ERRORS as e:
        raise DataError(f"{path}: the gzip file is damaged or cut short after line {lineno:,} ({e}); download or "
                        "compress it again") from e


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file: a text file is one document, a JSONL line or parquet row another."""
    kind = _kind(path)
    if kind in TEXT_SUFFIXES:
        yield read_text_file(path)
    elif kind in JSONL_SUFFIXES:
        for lineno, line in jsonl_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{lineno}: no {text_field!r} field (choose another with --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield text
    elif kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("reading .parquet needs pyarrow: pip install 'slm[data]'") from e
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[text_field], batch_size=256):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text


def iter_hf_dataset(name: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Stream a Hugging Face dataset (needs the `datasets` package and a network)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("--hf-dataset needs the `datasets` package: pip install datasets") from e
    import os
    import socket

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"--hf-dataset {name}: offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)")
    try:  # fail fast offline instead of hanging on retries
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as e:
        raise DataError(f"--hf-dataset {name}: cannot reach huggingface.co ({e}); this machine looks offline") from e
    ds = datasets.load_dataset(name, split=split, streaming=True)
    for row in ds:
        if text_field not in row:
            raise DataError(f"--hf-dataset {name}: rows have no {text_field!r} field")
        yield row[text_field]


def count_documents(files: list[Path]) -> int:
    """About how many documents the files hold (non-blank JSONL lines, parquet rows, one per text file)."""
    n = 0
    for path in files:
        kind = _kind(path)
        if kind in JSONL_SUFFIXES:
            n += sum(1 for _ in jsonl_lines(path))
        elif kind == ".parquet":
            import pyarrow.parquet as pq

            n += pq.ParquetFile(path).metadata.num_rows
        else:
            n += 1
    return n
