"""Corpus preparation at scale: raw sources -> tokenized, deduplicated, packed, shuffled shards.

Stages (the command is `data_prep/prepare.py`; `run` does one or more of them):

1. plan: the sources are cut into work units (`sources.plan_units`: whole files, byte ranges of .jsonl files,
   runs of Parquet row groups; about `unit_mb` each). The plan depends only on the inputs and the settings and is
   kept as `<work>/plan.json`; a rerun (or another machine) with other inputs or settings is refused.
2. process: this machine's units (`units[rank::world_size]`) are tokenized by a pool of `workers` spawned
   processes (one tokenizer thread each), each unit into its own file written atomically (`units.py`). Units
   whose file exists are skipped, so an interrupted run resumes where it stopped.
3. merge (once, after every rank has finished): in corpus order (unit, document) the exact / near duplicates
   are found (`dedup.py`); every kept document goes to `val` with probability `val_fraction` (a seeded hash of
   its text, so copies of a text never straddle the split); each unit's documents are shuffled (seed, unit id),
   wrapped in BOS ... EOS and packed into rows of seq_len + 1 tokens (`StreamPacker`, policy "carry" or
   "drop", continuing across units, so only the very last partial row of a split is lost); finally all rows of
   a split are permuted with one seeded permutation (the global shuffle across shards) and written with
   `ShardWriter` (.bin files + index.json with counts, dtype, sha256), next to `dataset.json`. The output folder
   is built under a temporary name and renamed when complete.

Every unit file is a function of its input bytes and the settings, and the merge is one sequential pass: the
output is byte-identical for a given seed whatever the number of workers or machines.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raven_titan.data.dedup import EXACT, NEAR, duplicate_codes, uniform01
from raven_titan.data.prepare import MANIFEST, SPLITS, is_prepared
from raven_titan.data.shards import ShardWriter, StreamPacker, dtype_for_vocab, wrap_documents
from raven_titan.data.sources import plan_units
from raven_titan.data.tokenizer import TokenizerInfo, load_tokenizer
from raven_titan.data.units import init_worker, process_unit, read_unit_stats, unit_file
from raven_titan.errors import RavenError

PLAN_FILE = "plan.json"
PLAN_VERSION = 1
STAGES = ("all", "process", "merge", "report")
COUNTERS = ("documents", "empty", "undecodable", "malformed")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def slurm_rank_world() -> tuple[int, int]:
    """(rank, world size) from a SLURM job array (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN,
    SLURM_ARRAY_TASK_COUNT), else (0, 1)."""
    task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        return 0, 1
    return int(task) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0")), int(count)


@dataclass
class PrepConfig:
    sources: list[str]
    out: Path
    tokenizer: str = "tokenizer/shakespeare_4k"
    seq_len: int = 256
    packing: str = "carry"
    val_fraction: float = 0.05
    seed: int = 1597
    text_field: str = "text"
    chat_field: str = "messages"
    chunk_chars: int = 4000
    dedup: str = "none"  # "none", "exact", or "near" (exact + near)
    minhash_ngram: int = 5
    minhash_bands: int = 14
    minhash_rows: int = 8
    unit_mb: float = 64.0
    rows_per_file: int | None = None
    workers: int = field(default_factory=default_workers)
    rank: int = 0
    world_size: int = 1
    work_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser()
        self.work_dir = Path(self.work_dir or self.out.with_name(self.out.name + ".work")).expanduser()
        problems = [
            (self.seq_len < 1, "--seq-len must be >= 1"),
            (not 0 <= self.val_fraction < 1, "--val-fraction must lie in [0, 1)"),
            (self.packing not in ("carry", "drop"), "--packing must be carry or drop"),
            (self.dedup not in ("none", "exact", "near"), "--dedup must be none, exact or near"),
            (self.unit_mb <= 0, "--unit-mb must be > 0"),
            (self.workers < 0, "--workers must be >= 0"),
            (not 0 <= self.rank < self.world_size, f"rank {self.rank} outside [0, {self.world_size})"),
            (
                min(self.minhash_ngram, self.minhash_bands, self.minhash_rows) < 1,
                "minhash sizes must be >= 1",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise RavenError(message)
        if not self.sources:
            raise RavenError("no sources given")


@dataclass
class Plan:
    settings: dict[str, Any]
    units: list[dict[str, Any]]


def unit_settings(cfg: PrepConfig, info: TokenizerInfo) -> dict[str, Any]:
    """What the unit files depend on (a rerun must agree on all of it)."""
    minhash = None
    if cfg.dedup == "near":
        minhash = {"ngram": cfg.minhash_ngram, "bands": cfg.minhash_bands, "rows": cfg.minhash_rows}
    return {
        "sources": list(cfg.sources),
        "tokenizer_fingerprint": info.fingerprint,
        "text_field": cfg.text_field,
        "chat_field": cfg.chat_field,
        "chunk_chars": cfg.chunk_chars,
        "unit_bytes": max(1, int(cfg.unit_mb * 2**20)),
        "minhash": minhash,
    }


def load_or_create_plan(cfg: PrepConfig, info: TokenizerInfo) -> Plan:
    settings = unit_settings(cfg, info)
    fields = (cfg.text_field, cfg.chat_field)
    units = [asdict(u) for u in plan_units(cfg.sources, settings["unit_bytes"], fields)]
    plan = {"version": PLAN_VERSION, "settings": settings, "units": units}
    file = cfg.work_dir / PLAN_FILE
    if file.is_file():
        saved = json.loads(file.read_text())
        if saved != plan:
            old, new = saved.get("settings", {}), settings
            diff = [k for k in new if old.get(k) != new[k]] or ["the input files (names or sizes)"]
            raise RavenError(
                f"{cfg.work_dir} holds the work of another preparation (different {', '.join(diff)}); "
                "use another --work-dir (and --out) or delete it"
            )
    else:
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{PLAN_FILE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(plan, indent=1) + "\n")
        os.replace(tmp, file)  # several ranks may race here; they write the same content
    return Plan(settings, units)


class RateProgress:
    """One status line: units, documents, tokens, MB/s, tokens/s, ETA (by input bytes). Redrawn in place on a
    terminal, printed every `every` seconds otherwise."""

    def __init__(self, total_units: int, total_bytes: int, enabled: bool, every: float = 15.0) -> None:
        self.total_units, self.total_bytes, self.enabled = total_units, max(total_bytes, 1), enabled
        self.tty = sys.stderr.isatty()
        self.every = 0.25 if self.tty else every
        self.start = self.last = time.perf_counter()
        self.units = self.docs = self.tokens = self.bytes = 0

    def update(self, stats: dict[str, Any]) -> None:
        self.units += 1
        self.docs += stats["documents"]
        self.tokens += stats["tokens"]
        self.bytes += stats["bytes"]
        now = time.perf_counter()
        if now - self.last >= self.every or self.units == self.total_units:
            self.last = now
            self.show(final=self.units == self.total_units)

    def line(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        rate = self.bytes / dt
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else 0.0
        return (
            f"[data] {self.units}/{self.total_units} units | {self.docs:,} docs | {self.tokens / 1e6:,.1f} M tokens"
            f" | {rate / 1e6:.2f} MB/s | {self.tokens / dt / 1e6:.2f} M tokens/s | "
            f"{'ETA ' + _duration(eta) if self.units < self.total_units else 'took ' + _duration(dt)}"
        )

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + self.line() + "\033[K" + ("\n" if final else ""))
        else:
            sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def log(cfg: PrepConfig, message: str) -> None:
    if cfg.progress:
        print(f"[data] {message}", file=sys.stderr, flush=True)


def process(cfg: PrepConfig, plan: Plan, info: TokenizerInfo) -> list[dict[str, Any]]:
    """Tokenize this rank's units that are not done yet; returns the stats of all of this rank's units."""
    mine = plan.units[cfg.rank :: cfg.world_size]
    done = {u["id"] for u in mine if unit_file(cfg.work_dir, u["id"]).is_file()}
    todo = [u for u in mine if u["id"] not in done]
    results = [read_unit_stats(unit_file(cfg.work_dir, i)) for i in sorted(done)]
    if results:
        log(cfg, f"rank {cfg.rank}: {len(results)} of {len(mine)} units already done, skipped")
    if not todo:
        return results
    settings = {**plan.settings, "tokenizer_path": str(info.path), "work_dir": str(cfg.work_dir)}
    progress = RateProgress(len(todo), sum(u["size"] for u in todo), cfg.progress)
    workers = min(cfg.workers, len(todo))
    log(
        cfg,
        f"rank {cfg.rank}/{cfg.world_size}: tokenizing {len(todo)} units with {workers or 'no'} worker processes",
    )
    if workers == 0:
        init_worker(settings, single_thread=False)
        for unit in todo:
            results.append(process_unit(unit))
            progress.update(results[-1])
    else:
        with multiprocessing.get_context("spawn").Pool(workers, init_worker, (settings, True)) as pool:
            for stats in pool.imap_unordered(process_unit, todo):
                results.append(stats)
                progress.update(stats)
    report_problems(cfg, results)
    return results


def report_problems(cfg: PrepConfig, results: list[dict[str, Any]]) -> None:
    """One summary line per kind of skipped input, with the first place it occurred."""
    what = {
        "undecodable": "lines/documents that are not valid UTF-8",
        "malformed": f"lines that are not JSON or have no usable {cfg.text_field!r} / {cfg.chat_field!r}",
        "empty": "empty documents",
    }
    for kind, description in what.items():
        count = sum(r[kind] for r in results)
        if count:
            first = next((r["first_problem"][kind] for r in results if kind in r["first_problem"]), None)
            log(cfg, f"skipped {count:,} {description}" + (f" (first: {first})" if first else ""))


def merge(cfg: PrepConfig, plan: Plan, info: TokenizerInfo) -> Path:
    """Dedup, split, pack, shuffle and write the dataset folder (see the module docstring)."""
    if is_prepared(cfg.out):
        log(cfg, f"{cfg.out} is already complete; nothing to merge")
        return cfg.out
    if cfg.out.exists():
        raise RavenError(f"{cfg.out} exists but is not a complete dataset; delete it and rerun the merge")
    missing = [u for u in plan.units if not unit_file(cfg.work_dir, u["id"]).is_file()]
    if missing:
        raise RavenError(
            f"{len(missing)} of {len(plan.units)} units are not tokenized yet (e.g. unit {missing[0]['id']} of "
            f"{missing[0]['path']}); run --stage process for every rank (or a plain run) first"
        )
    start = time.perf_counter()
    files = [unit_file(cfg.work_dir, u["id"]) for u in plan.units]
    near = cfg.dedup == "near"
    hashes, bands, doc_start = [], [], [0]
    for f in files:
        with np.load(f) as z:
            hashes.append(z["hashes"])
            if near:
                bands.append(z["bands"])
        doc_start.append(doc_start[-1] + len(hashes[-1]))
    all_hashes = np.concatenate(hashes)
    all_bands = np.concatenate(bands) if near else None
    codes = duplicate_codes(all_hashes, all_bands, cfg.dedup != "none", near)
    to_val = uniform01(all_hashes, cfg.seed) < cfg.val_fraction
    log(
        cfg,
        f"merge: {len(all_hashes):,} documents, {int((codes == EXACT).sum()):,} exact and "
        f"{int((codes == NEAR).sum()):,} near duplicates removed",
    )

    row_len, dtype = cfg.seq_len + 1, dtype_for_vocab(info.vocab_size)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.parent / f".{cfg.out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    log(cfg, f"merge: packing {len(plan.units)} units into rows of {row_len} tokens ({cfg.packing})")
    try:
        sources = _pack_units(cfg, plan, info, files, doc_start, codes, to_val, tmp, row_len, dtype)
        counts: dict[str, dict[str, int]] = {"rows": {}, "tokens_in_rows": {}, "documents": {}}
        for si, split in enumerate(SPLITS):
            raw = tmp / f".{split}.rows"
            n = raw.stat().st_size // (row_len * dtype.itemsize)
            if n == 0 and (split == "train" or cfg.val_fraction > 0):
                raise RavenError(
                    f"too little text for seq_len {cfg.seq_len}: the {split} split gets no complete row of "
                    f"{row_len} tokens; add text, lower --seq-len or raise --val-fraction"
                )
            log(cfg, f"merge: writing {n:,} {split} rows in shuffled order")
            _write_shuffled(raw, n, row_len, dtype, tmp / split, cfg, info, seed_key=si)
            raw.unlink()
            counts["rows"][split] = int(n)
            counts["tokens_in_rows"][split] = int(n * row_len)
            counts["documents"][split] = sum(s[f"{split}_documents"] for s in sources.values())
        manifest = {
            "recipe": "data_prep/prepare.py",
            "seq_len": cfg.seq_len,
            "row_len": row_len,
            "val_fraction": cfg.val_fraction,
            "shuffle_seed": cfg.seed,
            "packing": cfg.packing,
            "dedup": cfg.dedup,
            **({"minhash": plan.settings["minhash"]} if near else {}),
            "tokenizer_fingerprint": info.fingerprint,
            "tokenizer": cfg.tokenizer,
            "vocab_size": info.vocab_size,
            "document_tokens": sum(s["tokens_kept"] for s in sources.values()),
            **counts,
            "units": len(plan.units),
            "sources": [{"source": name, **s} for name, s in sources.items()],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.rename(tmp, cfg.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in (cfg.work_dir / "units").glob(".*.tmp-*"):  # left by killed workers; all ranks are done
        stale.unlink(missing_ok=True)
    if cfg.progress:
        print_source_table(manifest["sources"], merged=True)
    log(
        cfg,
        f"wrote {cfg.out}: {counts['rows']['train']:,} train + {counts['rows']['val']:,} val rows of {row_len} "
        f"tokens in {time.perf_counter() - start:.1f} s (unit files stay in {cfg.work_dir}; delete them when done)",
    )
    return cfg.out


def _pack_units(cfg, plan, info, files, doc_start, codes, to_val, tmp, row_len, dtype) -> dict[str, dict]:
    """Pass over the units in plan order: pack the kept documents of each split into `tmp/.<split>.rows`."""
    packers = {s: StreamPacker(row_len, cfg.packing, dtype) for s in SPLITS}
    raws = {s: open(tmp / f".{s}.rows", "wb") for s in SPLITS}  # closed in `finally`
    sources: dict[str, dict[str, int]] = {}
    try:
        for unit, f, d0, d1 in zip(plan.units, files, doc_start[:-1], doc_start[1:]):
            with np.load(f) as z:
                tokens, lengths, stats = z["tokens"], z["lengths"], json.loads(str(z["stats"]))
            c, v = codes[d0:d1], to_val[d0:d1]
            s = sources.setdefault(
                unit["source"],
                dict.fromkeys(
                    (
                        "bytes",
                        *COUNTERS,
                        "exact_duplicates",
                        "near_duplicates",
                        "train_documents",
                        "val_documents",
                        "tokens_read",
                        "tokens_kept",
                    ),
                    0,
                ),
            )
            s["bytes"] += unit["size"]
            for k in COUNTERS:
                s[k] += stats[k]
            s["exact_duplicates"] += int((c == EXACT).sum())
            s["near_duplicates"] += int((c == NEAR).sum())
            s["tokens_read"] += int(lengths.sum())
            s["tokens_kept"] += int(lengths[c == 0].sum())
            rng = np.random.default_rng([cfg.seed, unit["id"]])
            for split, mask in (("train", (c == 0) & ~v), ("val", (c == 0) & v)):
                order = rng.permutation(np.flatnonzero(mask))
                s[f"{split}_documents"] += len(order)
                stream, wrapped = wrap_documents(tokens, lengths, order, info.bos_id, info.eos_id)
                raws[split].write(packers[split].feed(stream, wrapped).tobytes())
    finally:
        for fh in raws.values():
            fh.close()
    return sources


def _write_shuffled(
    raw: Path, n: int, row_len: int, dtype, split_dir: Path, cfg, info, seed_key: int
) -> None:
    """Rows of `raw` in one seeded random order into a split folder (ShardWriter: .bin files + index.json)."""
    writer = ShardWriter(split_dir, row_len, info.vocab_size, info.fingerprint, cfg.rows_per_file)
    if n:
        rows = np.memmap(raw, dtype=dtype, mode="r", shape=(n, row_len))
        perm = np.random.default_rng([cfg.seed, 1 << 32, seed_key]).permutation(n)
        chunk = max(1, 2**26 // (row_len * dtype.itemsize))  # ~64 MiB per gather
        for a in range(0, n, chunk):
            idx = perm[a : a + chunk]
            pos = np.argsort(idx)  # read in file order, place in permuted order
            block = np.empty((len(idx), row_len), dtype=dtype)
            block[pos] = rows[idx[pos]]
            writer.write(block)
        del rows
    writer.close()


def print_source_table(rows: list[dict[str, Any]], merged: bool) -> None:
    """Token-count report per source (stdout)."""
    cols = ["bytes", "documents", "empty", "undecodable", "malformed"]
    cols += ["exact_duplicates", "near_duplicates", "tokens_kept"] if merged else ["tokens"]
    head = ["source", *cols, "tokens/doc"]
    table = []
    for r in rows:
        kept = r["documents"] - r.get("exact_duplicates", 0) - r.get("near_duplicates", 0)
        tokens = r["tokens_kept"] if merged else r["tokens"]
        table.append([r["source"], *(f"{r[c]:,}" for c in cols), f"{tokens / max(kept, 1):,.0f}"])
    total = {c: sum(r[c] for r in rows) for c in cols}
    table.append(["TOTAL", *(f"{total[c]:,}" for c in cols), ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    for line in [head, *table]:
        print(
            "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths)))
        )


def report(cfg: PrepConfig, plan: Plan) -> list[dict[str, Any]]:
    """Per-source counts from the units tokenized so far (before dedup; no merge needed)."""
    per: dict[str, dict[str, Any]] = {}
    done = 0
    for u in plan.units:
        f = unit_file(cfg.work_dir, u["id"])
        if not f.is_file():
            continue
        done += 1
        stats = read_unit_stats(f)
        r = per.setdefault(
            u["source"], {"source": u["source"], "bytes": 0, "tokens": 0, **dict.fromkeys(COUNTERS, 0)}
        )
        for k in ("bytes", "tokens", *COUNTERS):
            r[k] += stats[k]
    print(f"# {done} of {len(plan.units)} units tokenized")
    print_source_table(list(per.values()), merged=False)
    return list(per.values())


def run(cfg: PrepConfig, stage: str = "all") -> Path | None:
    """The command's work for one stage (see `STAGES`); returns the dataset folder once merged."""
    if stage not in STAGES:
        raise RavenError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    info = load_tokenizer(cfg.tokenizer)
    plan = load_or_create_plan(cfg, info)
    if stage == "report":
        report(cfg, plan)
        return None
    if is_prepared(cfg.out):
        log(cfg, f"{cfg.out} is already complete; nothing to do")
        return cfg.out
    if stage in ("all", "process"):
        process(cfg, plan, info)
    if stage == "merge" or (stage == "all" and cfg.world_size == 1):
        return merge(cfg, plan, info)
    if stage == "all":
        log(cfg, f"rank {cfg.rank} done; once every rank is done, run the same command with --stage merge")
    return None
