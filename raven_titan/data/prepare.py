"""Text documents -> a prepared dataset folder (tokenize, shuffle, split, pack, write), written atomically.

This is the one preparation path: the built-in corpus (`default_corpus.py`) and the
`data_prep/prepare_text.py` command both call `build_dataset`. Layout of the folder it writes::

    <out_dir>/dataset.json        what was prepared and how (recipe, seq_len, seed, counts, sources)
    <out_dir>/train/index.json    + train/*.bin   (format: raven_titan.data.shards)
    <out_dir>/val/index.json      + val/*.bin

The folder is built under a temporary name next to `out_dir` and renamed into place at the end, so a folder
with the final name is always complete; an interrupted preparation leaves only a `.<name>.tmp-*` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raven_titan.data.shards import INDEX_FILE, PackingPolicy, pack_documents, write_split
from raven_titan.data.sources import split_into_documents  # noqa: F401  (re-exported: its former home)
from raven_titan.data.tokenizer import TokenizerInfo
from raven_titan.errors import RavenError

MANIFEST = "dataset.json"
SPLITS = ("train", "val")


class Progress:
    """Minimal progress display on stderr: one updating line on a terminal, a line per stage otherwise."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self._last_stage = ""

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled:
            return
        count = f" {done}/{total}" if done is not None and total else ""
        if self.tty:
            sys.stderr.write(f"\r[data] {stage}{count}\033[K")
            sys.stderr.flush()
        elif stage != self._last_stage:
            sys.stderr.write(f"[data] {stage}\n")
        self._last_stage = stage

    def finish(self, message: str) -> None:
        if self.enabled:
            prefix, clear = ("\r", "\033[K") if self.tty else ("", "")
            sys.stderr.write(f"{prefix}[data] {message} ({time.perf_counter() - self.start:.1f} s){clear}\n")
            sys.stderr.flush()


def tokenize_documents(
    texts: Sequence[str], info: TokenizerInfo, progress: Progress | None = None, batch: int = 256
) -> list[np.ndarray]:
    """Encode texts without adding special tokens. Special-token strings that occur in the text (e.g. a
    literal "<|end_text|>") are encoded as plain text, so documents cannot inject control tokens."""
    tok = info.tokenizer
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    dtype = np.uint16 if info.vocab_size <= 2**16 else np.uint32
    out: list[np.ndarray] = []
    try:
        for start in range(0, len(texts), batch):
            for enc in encode(list(texts[start : start + batch]), add_special_tokens=False):
                out.append(np.asarray(enc.ids, dtype=dtype))
            if progress:
                progress("tokenizing documents", min(start + batch, len(texts)), len(texts))
    finally:
        tok.encode_special_tokens = previous
    return out


def split_train_val(num_tokens: Sequence[int], val_fraction: float) -> int:
    """Number of documents, from the end of the (shuffled) list, that hold >= val_fraction of the tokens."""
    if val_fraction <= 0 or len(num_tokens) < 2:
        return 0
    target = val_fraction * sum(num_tokens)
    acc, k = 0, 0
    while acc < target and k < len(num_tokens) - 1:
        k += 1
        acc += num_tokens[-k]
    return k


def is_prepared(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and all((folder / s / INDEX_FILE).is_file() for s in SPLITS)


def build_dataset(
    documents: Sequence[str],
    out_dir: str | Path,
    info: TokenizerInfo,
    seq_len: int,
    val_fraction: float,
    seed: int,
    policy: PackingPolicy = "carry",
    meta: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Tokenize `documents`, shuffle them (numpy PCG64 seeded with `seed`), hold out the last documents
    holding `val_fraction` of the tokens as `val` (train and val never share a document), pack each split into
    rows of seq_len + 1 tokens with `policy`, write the folder atomically (refuses an existing out_dir)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise RavenError(f"{out_dir} already exists; remove it or choose another output folder")
    progress = progress or Progress(enabled=False)
    row_len = seq_len + 1
    tokens = tokenize_documents(documents, info, progress)
    order = np.random.default_rng(seed).permutation(len(tokens))
    tokens = [tokens[i] for i in order]
    k = split_train_val([len(t) + 2 for t in tokens], val_fraction)
    parts = {"train": tokens[: len(tokens) - k], "val": tokens[len(tokens) - k :]}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    counts: dict[str, Any] = {"documents": {}, "rows": {}, "tokens_in_rows": {}}
    try:
        for split, docs in parts.items():
            progress(f"packing {split}")
            rows = pack_documents(docs, row_len, info.bos_id, info.eos_id, policy)
            if len(rows) == 0 and (split == "train" or val_fraction > 0):
                raise RavenError(
                    f"too little text for seq_len {seq_len}: the {split} split gets no complete row of "
                    f"{row_len} tokens ({sum(len(d) for d in docs)} tokens in {len(docs)} documents); "
                    "add text or lower training.seq_len / raise val_fraction"
                )
            write_split(tmp / split, rows, vocab_size=info.vocab_size, tokenizer_fingerprint=info.fingerprint)
            counts["documents"][split] = len(docs)
            counts["rows"][split] = int(len(rows))
            counts["tokens_in_rows"][split] = int(rows.size)
        manifest = {
            "seq_len": seq_len,
            "row_len": row_len,
            "val_fraction": val_fraction,
            "shuffle_seed": seed,
            "packing": policy,
            "tokenizer_fingerprint": info.fingerprint,
            "tokenizer_path": str(info.path),
            "vocab_size": info.vocab_size,
            "document_tokens": int(sum(len(t) for t in tokens)),
            **counts,
            **(meta or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_prepared(out_dir):  # somebody else's complete folder is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
