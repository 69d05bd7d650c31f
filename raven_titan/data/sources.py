"""Raw text sources: finding input files, cutting them into work units, and reading documents from a unit.

Formats (by file name):

- ``.txt``: UTF-8 text, cut into documents of whole paragraphs (`split_into_documents`, >= `chunk_chars`
  characters; `chunk_chars` 0: the whole file is one document). One work unit per file.
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line. A record is a plain document if its `text_field` holds
  a string, a chat if its `chat_field` holds a list of messages (``{"role"|"from": ..., "content"|"value":
  ...}``; rendered later with Huginn's chat template). Plain ``.jsonl`` is cut into byte ranges of about
  `unit_bytes`: a unit owns the lines that *start* inside its range. ``.jsonl.gz`` is one unit per file.
- ``.parquet`` (needs the optional `pyarrow`): the same two fields as columns; units are runs of whole row
  groups of about `unit_bytes` (uncompressed).

A source is one command-line argument: a file, a folder (every supported file below it, sorted) or a glob.
Bad input never stops a run: lines that are not UTF-8 (`undecodable`), not JSON or without a usable field
(`malformed`) and documents that are only whitespace (`empty`) are counted in `ReadStats` and skipped.
This module does not import torch: it runs in the preparation worker processes.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raven_titan.errors import RavenError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".parquet": "parquet"}
Chat = list[tuple[str, str]]
Document = str | Chat  # a plain text, or a chat as (role, content) pairs


def split_into_documents(text: str, min_chars: int = 4000) -> list[str]:
    """Cut a long text into documents of whole paragraphs (blank-line separated), each >= `min_chars`
    characters except possibly one short text; a short final piece is merged into the previous document."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    paragraphs = [p for p in paragraphs if p.strip()]
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if docs and size < min_chars // 2:
            docs[-1] = docs[-1] + "\n\n" + "\n\n".join(current)
        else:
            docs.append("\n\n".join(current))
    return docs


def import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise RavenError(
            "reading .parquet files needs pyarrow, which is not installed: pip install pyarrow==26.0.1 "
            "(the 'data' extra)"
        ) from None
    return pq


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in sorted(KINDS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return kind
    return None


def expand_source(spec: str) -> list[Path]:
    """The files of one source argument: a file, a folder (supported files below it) or a glob, sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        if file_kind(path) is None:
            raise RavenError(f"{path}: unsupported file type (expected {', '.join(KINDS)})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p))
    elif glob.has_magic(spec):
        files = sorted(
            p for p in map(Path, glob.glob(str(path), recursive=True)) if p.is_file() and file_kind(p)
        )
    else:
        raise RavenError(f"source {spec!r} not found (expected a file, a folder or a glob pattern)")
    if not files:
        raise RavenError(f"source {spec!r} holds no {', '.join(KINDS)} files")
    return files


@dataclass(frozen=True)
class Unit:
    """One piece of work: a whole file, a byte range of a .jsonl file or a run of Parquet row groups."""

    id: int
    source: str
    path: str
    kind: str
    start: int  # byte offset (.jsonl) or first row group (.parquet); 0 otherwise
    end: int  # end byte / end row group (exclusive); the file size otherwise
    size: int  # input bytes it covers (progress and ETA)


def plan_units(sources: Sequence[str], unit_bytes: int, fields: Sequence[str] = ()) -> list[Unit]:
    """All units of `sources` in a fixed order (source, file, offset); depends only on the files' names and
    sizes (and Parquet metadata), never on the number of workers or machines. A Parquet file needs one of
    `fields` among its columns."""
    units: list[Unit] = []
    for source in sources:
        for path in expand_source(source):
            kind = file_kind(path)
            size = path.stat().st_size
            spans: list[tuple[int, int, int]] = []
            if kind == "jsonl":
                spans = [
                    (s, min(s + unit_bytes, size), min(unit_bytes, size - s))
                    for s in range(0, size, unit_bytes)
                ]
            elif kind == "parquet":
                spans = _parquet_spans(path, unit_bytes, fields)
            if not spans:
                spans = [(0, size, size)]
            for start, end, nbytes in spans:
                units.append(Unit(len(units), source, str(path), kind, start, end, nbytes))
    return units


def _parquet_spans(path: Path, unit_bytes: int, fields: Sequence[str]) -> list[tuple[int, int, int]]:
    pq = import_pyarrow_parquet()
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise RavenError(f"{path}: not a readable Parquet file ({e})") from None
    names = set(meta.schema.to_arrow_schema().names)
    if fields and not names & set(fields):
        raise RavenError(f"{path} has none of the columns {list(fields)} (it has {sorted(names)})")
    spans, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= unit_bytes or g == meta.num_row_groups - 1:
            spans.append((start, g + 1, acc))
            start, acc = g + 1, 0
    return spans


@dataclass
class ReadStats:
    documents: int = 0  # documents handed on (non-empty, decodable)
    empty: int = 0
    undecodable: int = 0
    malformed: int = 0
    first_problem: dict[str, str] = field(default_factory=dict)  # kind -> "file:line" of the first case

    def problem(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.first_problem.setdefault(kind, where)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_chat(messages: Any) -> Chat | None:
    """(role, content) pairs of a chat record, or None if it is not a list of messages with string fields."""
    if not isinstance(messages, list):
        return None
    out = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        out.append((role, content))
    return out


def _record_document(record: Any, text_field: str, chat_field: str) -> Document | None:
    if not isinstance(record, dict):
        return None
    text = record.get(text_field)
    if isinstance(text, str):
        return text
    return normalize_chat(record.get(chat_field))


def is_empty(doc: Document) -> bool:
    if isinstance(doc, str):
        return not doc.strip()
    return not any(content.strip() for _, content in doc)


def read_unit(
    unit: Unit,
    stats: ReadStats,
    text_field: str = "text",
    chat_field: str = "messages",
    chunk_chars: int = 4000,
) -> Iterator[Document]:
    """The documents of `unit` in file order; bad lines and empty documents are counted in `stats`."""
    if unit.kind == "txt":
        docs: Iterator[Document] = _read_txt(Path(unit.path), stats, chunk_chars)
    elif unit.kind == "parquet":
        docs = _read_parquet(unit, stats, text_field, chat_field)
    else:
        docs = _read_jsonl(unit, stats, text_field, chat_field)
    for doc in docs:
        if is_empty(doc):
            stats.empty += 1
            continue
        stats.documents += 1
        yield doc


def _read_txt(path: Path, stats: ReadStats, chunk_chars: int) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # keep the decodable lines, count the others
        lines = []
        for lineno, line in enumerate(raw.splitlines(keepends=True), 1):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                stats.problem("undecodable", f"{path}:{lineno}")
        text = "".join(lines)
    text = text.replace("\r\n", "\n")
    if chunk_chars > 0:
        yield from split_into_documents(text, chunk_chars)
    else:
        yield text


def _jsonl_lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(line number within the unit, line) for the lines that start inside [unit.start, unit.end)."""
    if unit.kind == "jsonl.gz":
        with gzip.open(unit.path, "rb") as fh:
            yield from enumerate(fh, 1)
        return
    with open(unit.path, "rb") as fh:
        if unit.start > 0:
            fh.seek(unit.start - 1)
            fh.readline()  # the rest of the line that started before this unit (or just its newline)
        pos = fh.tell()
        lineno = 0
        while pos < unit.end:
            line = fh.readline()
            if not line:
                break
            pos += len(line)
            lineno += 1
            yield lineno, line


def _read_jsonl(unit: Unit, stats: ReadStats, text_field: str, chat_field: str) -> Iterator[Document]:
    where = unit.path if unit.start == 0 else f"{unit.path} (from byte {unit.start})"
    for lineno, line in _jsonl_lines(unit):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            stats.problem("undecodable", f"{where}:{lineno}")
            continue
        try:
            doc = _record_document(json.loads(text), text_field, chat_field)
        except ValueError:  # json.JSONDecodeError
            doc = None
        if doc is None:
            stats.problem("malformed", f"{where}:{lineno}")
            continue
        yield doc


def _read_parquet(unit: Unit, stats: ReadStats, text_field: str, chat_field: str) -> Iterator[Document]:
    pq = import_pyarrow_parquet()
    pf = pq.ParquetFile(unit.path)
    columns = [c for c in (text_field, chat_field) if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(unit.start, unit.end), columns=columns):
        cols = {name: batch.column(name).to_pylist() for name in columns}
        for i in range(batch.num_rows):
            doc = _record_document({k: v[i] for k, v in cols.items()}, text_field, chat_field)
            if doc is None:
                stats.problem("malformed", f"{unit.path} (row group {unit.start}+, row {row + i})")
            else:
                yield doc
        row += batch.num_rows
