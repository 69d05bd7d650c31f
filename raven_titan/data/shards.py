"""Packed-token shards: the on-disk format every training run reads, and the packer that produces its rows.

A prepared dataset is a folder with one sub-folder per split (`train/`, `val/`). A split holds:

- one or more `*.bin` files: raw little-endian `uint16` token ids (`uint32` if the vocabulary has more than
  65,536 ids), no header; rows of exactly `row_len` (= seq_len + 1) tokens back to back, so a file of
  `num_rows` rows is `num_rows * row_len * itemsize` bytes;
- `index.json` (written last, atomically: a split without it is incomplete)::

    {"format_version": 1, "dtype": "uint16", "row_len": 257, "vocab_size": 4096, "num_rows": 5890,
     "tokenizer_fingerprint": "0123456789abcdef",
     "files": [{"name": "00000.bin", "num_rows": 5890, "sha256": "..."}]}

Rows are addressed globally in file order (`PackedRows`). A row is one training example: input = row[:-1],
labels = row[1:].
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from raven_titan.errors import RavenError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TARGET_FILE_BYTES = 256 * 2**20  # default size of one .bin file
VERIFY_BLOCK_BYTES = 2**24  # validate reads files in blocks of about this size (rounded down to whole rows)
PackingPolicy = Literal["carry", "drop"]
logger = logging.getLogger(__name__)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def pack_documents(
    token_lists: Iterable[Sequence[int] | np.ndarray],
    row_len: int,
    bos: int,
    eos: int,
    policy: PackingPolicy = "carry",
) -> np.ndarray:
    """Pack tokenized documents into rows of exactly `row_len` tokens: an int64 array [num_rows, row_len].

    Every document is wrapped as BOS, tokens..., EOS and the wrapped documents are concatenated in order.

    - ``"carry"`` (default; no token is wasted): the concatenated stream is cut into consecutive rows of
      `row_len` tokens. A document that does not fit in the current row continues at the start of the next one
      (its tail is carried over), so rows usually start mid-document. Only the final partial row (fewer than
      `row_len` tokens) is dropped. Concatenating all rows gives exactly a prefix of the wrapped stream.
    - ``"drop"`` (Huginn's packing, spec section 8.1 without "sacred" sources): wrapped documents are appended
      to a buffer; as soon as the buffer holds >= `row_len` tokens its first `row_len` tokens become a row and
      the rest of the buffer is discarded ("incinerated"). Every row therefore starts with BOS at a document
      boundary, short documents share a row, and documents longer than a row are truncated. A final buffer
      shorter than `row_len` is dropped.
    """
    if row_len < 2:
        raise ValueError(f"row_len must be >= 2, got {row_len}")
    if policy not in ("carry", "drop"):
        raise ValueError(f"unknown packing policy {policy!r}: expected 'carry' or 'drop'")
    docs = [np.asarray(d, dtype=np.int64).reshape(-1) for d in token_lists]
    if policy == "carry":
        total = sum(len(d) + 2 for d in docs)
        stream = np.empty(total, dtype=np.int64)
        pos = 0
        for d in docs:
            stream[pos] = bos
            stream[pos + 1 : pos + 1 + len(d)] = d
            stream[pos + 1 + len(d)] = eos
            pos += len(d) + 2
        n = total // row_len
        return stream[: n * row_len].reshape(n, row_len)
    rows: list[np.ndarray] = []
    buffer: list[np.ndarray] = []
    filled = 0
    for d in docs:
        buffer.append(np.concatenate(([bos], d, [eos])))
        filled += len(d) + 2
        if filled >= row_len:
            rows.append(np.concatenate(buffer)[:row_len])
            buffer, filled = [], 0
    if not rows:
        return np.empty((0, row_len), dtype=np.int64)
    return np.stack(rows).astype(np.int64, copy=False)


def wrap_documents(
    tokens: np.ndarray, lengths: np.ndarray, order: np.ndarray, bos: int, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """Documents `order` (indices into `lengths`) of the back-to-back `tokens`, each wrapped as BOS, tokens,
    EOS and concatenated in that order (vectorized). Returns (stream, wrapped lengths)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    sel = lengths[order]
    wrapped = sel + 2
    stream = np.empty(int(wrapped.sum()), dtype=tokens.dtype)
    starts = np.cumsum(wrapped) - wrapped
    body = np.ones(len(stream), dtype=bool)
    body[starts] = body[starts + sel + 1] = False
    stream[starts] = bos
    stream[starts + sel + 1] = eos
    n = int(sel.sum())
    src = np.repeat(offsets[order] - (np.cumsum(sel) - sel), sel) + np.arange(n)
    stream[body] = tokens[src]
    return stream, wrapped


class StreamPacker:
    """`pack_documents` for a corpus that arrives in pieces: `feed` takes the next wrapped documents (a stream
    from `wrap_documents` and the wrapped lengths) and returns the rows completed so far; tokens not yet in a
    row wait in `pending` for the next call. Feeding a document list in any number of pieces gives the same
    rows as one `pack_documents` call over the whole list (same policies)."""

    def __init__(
        self, row_len: int, policy: PackingPolicy = "carry", dtype: np.dtype | type = np.int64
    ) -> None:
        if row_len < 2:
            raise ValueError(f"row_len must be >= 2, got {row_len}")
        if policy not in ("carry", "drop"):
            raise ValueError(f"unknown packing policy {policy!r}: expected 'carry' or 'drop'")
        self.row_len, self.policy = row_len, policy
        self.pending = np.zeros(0, dtype=dtype)

    def feed(self, stream: np.ndarray, wrapped_lengths: np.ndarray) -> np.ndarray:
        s = np.concatenate([self.pending, np.asarray(stream, dtype=self.pending.dtype)])
        L = self.row_len
        if self.policy == "carry":
            n = len(s) // L
            self.pending = s[n * L :].copy()
            return s[: n * L].reshape(n, L)
        starts, start = [], 0  # "drop": the buffer always begins at a document boundary
        for end in (len(self.pending) + np.cumsum(wrapped_lengths)).tolist():
            if end - start >= L:
                starts.append(start)
                start = end
        self.pending = s[start:].copy()
        if not starts:
            return np.zeros((0, L), dtype=s.dtype)
        return s[np.asarray(starts)[:, None] + np.arange(L)]


class ShardWriter:
    """Writes rows of one split into `.bin` files (rolling over every `rows_per_file` rows) and `index.json`.

    Rows can be appended in any number of `write` calls (the seam for streaming / multi-process preparation);
    `close` writes the index, which is what makes the split readable.
    """

    def __init__(
        self,
        split_dir: str | Path,
        row_len: int,
        vocab_size: int,
        tokenizer_fingerprint: str | None = None,
        rows_per_file: int | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.row_len = row_len
        self.vocab_size = vocab_size
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.dtype = dtype_for_vocab(vocab_size)
        self.rows_per_file = rows_per_file or max(1, TARGET_FILE_BYTES // (row_len * self.dtype.itemsize))
        self.files: list[dict[str, Any]] = []
        self._handle = None
        self._hash = None
        self._rows_in_file = 0
        self.split_dir.mkdir(parents=True, exist_ok=True)

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.row_len:
            raise ValueError(f"rows must have shape [n, {self.row_len}], got {list(rows.shape)}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got [{rows.min()}, {rows.max()}]"
            )
        rows = rows.astype(self.dtype, copy=False)
        start = 0
        while start < len(rows):
            if self._handle is None:
                self._open_next()
            take = min(len(rows) - start, self.rows_per_file - self._rows_in_file)
            data = np.ascontiguousarray(rows[start : start + take]).tobytes()
            self._handle.write(data)
            self._hash.update(data)
            self._rows_in_file += take
            start += take
            if self._rows_in_file == self.rows_per_file:
                self._finish_file()

    def _open_next(self) -> None:
        name = f"{len(self.files):05d}.bin"
        self._handle = open(self.split_dir / name, "wb")  # closed in _finish_file
        self._hash = hashlib.sha256()
        self._rows_in_file = 0
        self.files.append({"name": name, "num_rows": 0, "sha256": ""})

    def _finish_file(self) -> None:
        self._handle.close()
        self.files[-1].update(num_rows=self._rows_in_file, sha256=self._hash.hexdigest())
        self._handle = None

    def close(self) -> dict[str, Any]:
        if self._handle is not None:
            self._finish_file()
        index = {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "row_len": self.row_len,
            "vocab_size": self.vocab_size,
            "num_rows": sum(f["num_rows"] for f in self.files),
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "files": self.files,
        }
        tmp = self.split_dir / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, self.split_dir / INDEX_FILE)
        return index


def write_split(
    split_dir: str | Path,
    rows: np.ndarray | Iterable[np.ndarray],
    *,
    vocab_size: int,
    tokenizer_fingerprint: str | None = None,
    rows_per_file: int | None = None,
) -> dict[str, Any]:
    """Write `rows` (one [n, row_len] array or an iterable of them) as a split; returns the index written."""
    chunks = iter([rows] if isinstance(rows, np.ndarray) else rows)
    first = next(chunks, None)
    if first is None:
        raise ValueError("write_split needs at least one array of rows (it may have 0 rows)")
    first = np.asarray(first)
    writer = ShardWriter(split_dir, first.shape[-1], vocab_size, tokenizer_fingerprint, rows_per_file)
    writer.write(first)
    for chunk in chunks:
        writer.write(chunk)
    return writer.close()


def read_index(split_dir: str | Path) -> dict[str, Any]:
    """Parse and sanity-check `split_dir/index.json` (RavenError naming the file otherwise)."""
    file = Path(split_dir) / INDEX_FILE
    if not file.is_file():
        raise RavenError(f"{file} not found: not a prepared split (prepare data with data_prep/prepare.py)")
    try:
        index = json.loads(file.read_text())
        version, dtype = index["format_version"], np.dtype(index["dtype"])
        int(index["row_len"]), int(index["vocab_size"])
        files = [(str(f["name"]), int(f["num_rows"]), str(f["sha256"])) for f in index["files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RavenError(f"{file} is malformed ({type(e).__name__}: {e}); re-prepare the dataset") from None
    if version != FORMAT_VERSION:
        raise RavenError(
            f"{file} has format_version {version}; this version reads {FORMAT_VERSION}: re-prepare"
        )
    if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise RavenError(f"{file}: unsupported dtype {index['dtype']!r} (expected uint16 or uint32)")
    for name, _, _ in files:
        if Path(name).name != name:
            raise RavenError(f"{file}: file name {name!r} must be a plain name inside the split folder")
    return index


class PackedRows(Dataset):
    """Map-style dataset over all rows of one split (memory-mapped, opened lazily, picklable for workers).

    `dataset[i]` is a LongTensor of `row_len` tokens. Opening checks that every file exists and has the size
    the index implies (truncated files are refused); `validate` checks contents.
    """

    def __init__(self, split_dir: str | Path) -> None:
        self.split_dir = Path(split_dir)
        self.index = read_index(self.split_dir)
        self.row_len: int = int(self.index["row_len"])
        self.vocab_size: int = int(self.index["vocab_size"])
        self.dtype = np.dtype(self.index["dtype"])
        self.tokenizer_fingerprint: str | None = self.index.get("tokenizer_fingerprint")
        self.files = [
            (self.split_dir / f["name"], int(f["num_rows"]), f["sha256"]) for f in self.index["files"]
        ]
        self.offsets = np.cumsum([0] + [n for _, n, _ in self.files])
        self._maps: list[np.ndarray] | None = None
        for path, num_rows, _ in self.files:
            self._check_size(path, num_rows)

    def _check_size(self, path: Path, num_rows: int) -> None:
        expected = num_rows * self.row_len * self.dtype.itemsize
        if not path.is_file():
            raise RavenError(
                f"{path} is missing (listed in {self.split_dir / INDEX_FILE}); re-prepare the dataset"
            )
        size = path.stat().st_size
        if size != expected:
            kind = "truncated" if size < expected else "longer than expected"
            raise RavenError(
                f"{path} is {kind}: {size} bytes, index.json expects {expected} "
                f"({num_rows} rows x {self.row_len} tokens x {self.dtype.itemsize} bytes); "
                "re-prepare the dataset"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [
                np.memmap(path, dtype=self.dtype, mode="r", shape=(n, self.row_len))
                if n
                else np.empty((0, self.row_len), self.dtype)
                for path, n, _ in self.files
            ]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None  # re-opened in the worker process instead of pickling the data
        return state

    def row(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        f = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self._open()[f][i - self.offsets[f]]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.row(int(i)).astype(np.int64))

    def validate(
        self,
        vocab_size: int,
        check_checksums: bool = True,
        row_len: int | None = None,
        check_tokens: bool = True,
        *,
        record_dir: Path | None = None,
        threads: int | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        """Refuse (RavenError naming the file) a row_len or vocabulary mismatch, a truncated file, a checksum
        mismatch (`check_checksums`) or a token id >= `vocab_size` (`check_tokens`).

        Files are read once each (hash and token range from the same blocks) on `threads` threads (default
        min(8, cpu count)); the first bad file in file order is reported. With `record_dir`, files that passed
        both checks are remembered in `record_dir/<key>.json` (key: hash of the split folder's absolute path)
        and skipped next time while their size, mtime and index checksum are unchanged and the vocabulary
        checked against was no larger: like make, the record trusts (size, mtime), so a same-size rewrite
        that restores the mtime is not noticed. An unreadable record counts as empty; one that cannot be
        written only logs a warning.

        `part = (k, n)` checks the contents of files k, k + n, k + 2n, ... only (sizes are checked for all): n
        processes share the reading, each recording its files in `<key>.part<k>of<n>.json`; later checks read
        the union of all records of the split."""
        index_file = self.split_dir / INDEX_FILE
        if row_len is not None and row_len != self.row_len:
            raise RavenError(
                f"{index_file}: rows have {self.row_len} tokens (seq_len {self.row_len - 1}) but the run "
                f"needs {row_len} (seq_len {row_len - 1}); set training.seq_len {self.row_len - 1} or "
                "re-prepare the data"
            )
        if self.vocab_size > vocab_size:
            raise RavenError(
                f"{index_file}: prepared with a vocabulary of {self.vocab_size} ids but the tokenizer/model "
                f"has {vocab_size}; use the tokenizer the data was prepared with or re-prepare the data"
            )
        for path, num_rows, _ in self.files:
            self._check_size(path, num_rows)
        if not (check_checksums or check_tokens):
            return
        key = hashlib.sha256(str(self.split_dir.resolve()).encode()).hexdigest()[:16]
        record_file = None
        if record_dir is not None:
            record_file = Path(record_dir) / (
                f"{key}.json" if part == (0, 1) else f"{key}.part{part[0]}of{part[1]}.json"
            )
        record = _load_records(Path(record_dir), key) if record_dir is not None else {}
        files = self.files[part[0] :: part[1]]
        start, passed, error = time.perf_counter(), {}, None
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            futures = [
                pool.submit(self._verify_file, f, vocab_size, check_checksums, check_tokens, record)
                for f in files
            ]
            for (path, _, _), future in zip(files, futures):
                try:
                    passed[path.name] = future.result()
                except BaseException as e:  # the first failure in file order; the rest is not needed
                    error = e
                    pool.shutdown(cancel_futures=True)
                    break
        checked = {name: entry for name, entry in passed.items() if entry is not None}
        if record_file and check_checksums and check_tokens and checked:
            _save_record(record_file, checked)
        if error is not None:
            raise error
        if checked:
            seconds = time.perf_counter() - start
            verified = sum(e["size"] for e in checked.values())
            skipped = sum(path.stat().st_size for path, _, _ in files if passed[path.name] is None)
            logger.info(
                "%s: verified %d files (%.1f MB) at %.0f MB/s; %d files (%.1f MB) skipped as already verified",
                self.split_dir,
                len(checked),
                verified / 1e6,
                verified / 1e6 / max(seconds, 1e-9),
                len(passed) - len(checked),
                skipped / 1e6,
            )

    def _verify_file(
        self,
        file: tuple[Path, int, str],
        vocab_size: int,
        check_checksums: bool,
        check_tokens: bool,
        record: dict[str, dict[str, Any]],
    ) -> dict[str, Any] | None:
        """Check one (path, num_rows, sha256) of `self.files`: None if `record` vouches for it, else (when it
        passes) its record entry; RavenError otherwise."""
        path, num_rows, sha = file
        self._check_size(path, num_rows)
        stat = path.stat()
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha, "vocab_size": vocab_size}
        old = record.get(path.name, {})
        known = isinstance(old.get("vocab_size"), int) and old["vocab_size"] <= vocab_size
        if known and all(old.get(k) == entry[k] for k in ("size", "mtime_ns", "sha256")):
            return None
        _check_contents(
            path,
            self.dtype,
            self.row_len,
            sha if check_checksums else None,
            vocab_size if check_tokens else None,
        )
        return entry


def _check_contents(
    path: Path, dtype: np.dtype, row_len: int, sha256: str | None, vocab_size: int | None
) -> None:
    """Read `path` once, in blocks of whole rows: RavenError if its hash is not `sha256`, else if a row holds a
    token id >= `vocab_size` (None: that check is off)."""
    row_bytes = row_len * dtype.itemsize
    buffer = bytearray(max(1, VERIFY_BLOCK_BYTES // row_bytes) * row_bytes)
    digest = hashlib.sha256() if sha256 is not None else None
    first_row, bad = 0, None  # bad: (row, its largest id), the first row holding an id >= vocab_size
    with open(path, "rb") as fh:
        while n := fh.readinto(buffer):
            block = memoryview(buffer)[:n]
            if digest is not None:
                digest.update(block)
            if vocab_size is not None and bad is None:
                rows = np.frombuffer(block, dtype=dtype, count=n // row_bytes * row_len).reshape(-1, row_len)
                if rows.size and int(rows.max()) >= vocab_size:
                    i = int(np.argmax(rows.max(axis=1) >= vocab_size))
                    bad = first_row + i, int(rows[i].max())
                    if digest is None:
                        break
            first_row += n // row_bytes
    if digest is not None and digest.hexdigest() != sha256:
        raise RavenError(f"{path}: checksum mismatch (file changed or corrupt); re-prepare the dataset")
    if bad is not None:
        raise RavenError(
            f"{path}: row {bad[0]} holds token id {bad[1]} >= vocabulary size "
            f"{vocab_size}; the data was prepared with another tokenizer: re-prepare it"
        )


def _load_record(file: Path) -> dict[str, dict[str, Any]]:
    """The verification record in `file` (name -> entry); empty if missing, unreadable or malformed."""
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {name: entry for name, entry in record.items() if isinstance(entry, dict)}


def _load_records(record_dir: Path, key: str) -> dict[str, dict[str, Any]]:
    """The union of a split's records (`<key>.json` and the `<key>.part*.json` of shared checks)."""
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(record_dir.glob(f"{key}*.json")):
        out.update(_load_record(file))
    return out


def _save_record(file: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge `entries` into the record in `file` (atomically); a failure only logs a warning."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        record = {**_load_record(file), **entries}
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=1)
        os.replace(tmp, file)
    except OSError as e:
        logger.warning("could not write the data verification record %s (%s); it will be re-checked", file, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
