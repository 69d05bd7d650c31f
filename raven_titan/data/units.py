"""Tokenizing one work unit (the part of data preparation that runs in worker processes; no torch import).

`process_unit` reads the documents of one unit (`sources.read_unit`), tokenizes them (chats through Huginn's
chat template: header/turn tokens as special ids, the text around them as plain text) and writes
`<work>/units/<id>.npz` atomically (temporary name, then rename), holding:

- ``tokens``: the documents' token ids back to back (uint16, or uint32 for vocabularies > 65,536), no BOS/EOS;
- ``lengths``: int64 [documents]; ``hashes``: uint64 [documents], the exact-duplicate key of each text;
- ``bands``: uint64 [documents, bands], MinHash LSH band keys (0 columns when near-dedup is off);
- ``stats``: JSON (source, bytes, documents, tokens, characters, empty / undecodable / malformed counts).

The file depends only on the unit's input bytes and the settings, never on which process or machine made it,
so a rerun can skip every unit whose file exists.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from raven_titan.data.dedup import MinHasher, text_hash
from raven_titan.data.sources import Document, ReadStats, Unit, read_unit
from raven_titan.data.tokenizer import chat_segments, load_tokenizer
from raven_titan.errors import RavenError

BATCH_DOCS = 512
BATCH_CHARS = 4 * 2**20

_state: dict[str, Any] = {}


def unit_file(work_dir: str | Path, unit_id: int) -> Path:
    return Path(work_dir) / "units" / f"{unit_id:06d}.npz"


def init_worker(settings: dict[str, Any], single_thread: bool) -> None:
    """Per-process set-up (the pool's initializer). `single_thread`: one tokenizer thread (worker processes
    share the cores among themselves). The tokenizer itself is loaded by the first `process_unit`, so that a
    failure there reaches the caller as an error instead of a pool that keeps restarting workers."""
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    _state.clear()
    _state["settings"] = settings


def _load() -> None:
    settings = _state["settings"]
    info = load_tokenizer(settings["tokenizer_path"])
    if info.fingerprint != settings["tokenizer_fingerprint"]:
        raise RavenError(
            f"tokenizer {info.path} changed during preparation (fingerprint {info.fingerprint}, the plan "
            f"has {settings['tokenizer_fingerprint']})"
        )
    info.tokenizer.encode_special_tokens = True  # special-token names inside documents stay plain text
    minhash = settings.get("minhash")
    _state.update(
        info=info,
        encode=getattr(info.tokenizer, "encode_batch_fast", info.tokenizer.encode_batch),
        dtype=np.dtype("<u2") if info.vocab_size <= 2**16 else np.dtype("<u4"),
        minhasher=MinHasher(**minhash) if minhash else None,
    )


class _Encoded:
    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.hashes: list[int] = []
        self.bands: list[np.ndarray] = []
        self.chars = 0


def _encode_batch(docs: list[Document], out: _Encoded, stats: ReadStats, where: str) -> None:
    info, dtype, minhasher = _state["info"], _state["dtype"], _state["minhasher"]
    texts: list[str] = []  # plain text pieces to encode, in order
    plans: list[list[int | None]] = []  # per document: special id, or None for the next encoded text piece
    keys: list[int] = []
    for doc in docs:
        if isinstance(doc, str):
            rendered, pieces = doc, [(doc, False)]
        else:
            pieces = chat_segments(doc)
            rendered = "".join(text for text, _ in pieces)
        try:
            data = rendered.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (e.g. from a JSON "\ud800" escape)
            stats.documents -= 1
            stats.problem("undecodable", where)
            continue
        keys.append(text_hash(data))
        out.chars += len(rendered)
        plan: list[int | None] = []
        for text, special in pieces:
            if special:
                plan.append(info.tokenizer.token_to_id(text))
            else:
                plan.append(None)
                texts.append(text)
        plans.append(plan)
    encodings = iter(_state["encode"](texts, add_special_tokens=False))
    for plan, key in zip(plans, keys):
        parts = [
            np.asarray(next(encodings).ids, dtype=dtype) if p is None else np.asarray([p], dtype=dtype)
            for p in plan
        ]
        ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out.tokens.append(ids)
        out.hashes.append(key)
        if minhasher is not None:
            out.bands.append(minhasher.band_keys(ids))


def process_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one unit into its unit file (skipped if it exists); returns the unit's stats."""
    settings = _state["settings"]
    target = unit_file(settings["work_dir"], unit["id"])
    if target.is_file():
        return read_unit_stats(target)
    if "info" not in _state:
        _load()
    u = Unit(**unit)
    start = time.perf_counter()
    stats, out = ReadStats(), _Encoded()
    batch: list[Document] = []
    size = 0
    reader = read_unit(u, stats, settings["text_field"], settings["chat_field"], settings["chunk_chars"])
    for doc in reader:
        batch.append(doc)
        size += len(doc) if isinstance(doc, str) else sum(len(c) for _, c in doc)
        if len(batch) >= BATCH_DOCS or size >= BATCH_CHARS:
            _encode_batch(batch, out, stats, u.path)
            batch, size = [], 0
    if batch:
        _encode_batch(batch, out, stats, u.path)
    dtype = _state["dtype"]
    lengths = np.array([len(t) for t in out.tokens], dtype=np.int64)
    nbands = settings["minhash"]["bands"] if settings.get("minhash") else 0
    result = {
        "unit": u.id,
        "source": u.source,
        "bytes": u.size,
        "tokens": int(lengths.sum()),
        "chars": out.chars,
        **stats.as_dict(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    arrays = {
        "tokens": np.concatenate(out.tokens) if out.tokens else np.zeros(0, dtype),
        "lengths": lengths,
        "hashes": np.array(out.hashes, dtype=np.uint64),
        "bands": np.stack(out.bands) if out.bands else np.zeros((len(lengths), nbands), np.uint64),
        "stats": np.array(json.dumps(result)),
    }
    write_atomic(target, arrays)
    return result


def write_atomic(target: Path, arrays: dict[str, np.ndarray]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def read_unit_stats(path: Path) -> dict[str, Any]:
    with np.load(path) as z:
        return json.loads(str(z["stats"]))
