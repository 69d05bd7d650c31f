"""Tokenize-and-pack throughput of data_prep/prepare.py against a bare `tokenizers` encode_batch loop.

Corpus: the built-in Shakespeare texts cut into ~4,000-character documents, repeated `--repeat` times, written
as JSONL (what a real source looks like). Measured:
  bare-1t      Tokenizer.encode_batch_fast over the same documents (batches of 512, ids materialized) in a
               fresh process with one tokenizer thread; only the loop is timed: no reading, packing, writing
  bare-2t      the same with tokenizers' own 2-thread parallelism (for context)
  pipeline-Np  the whole command with N worker processes (spawned, one tokenizer thread each): plan, read and
               parse JSONL, tokenize, hash, write unit files, then the single-process merge (pack, global
               shuffle, write shards with sha256); process start-up included
Both wall time and CPU time are reported. "per process" divides wall-clock throughput by the processes (or
threads) doing the work; "per CPU-s" divides by the CPU seconds actually used (workers + main process), which
stays meaningful on a machine shared with other jobs. MB = 10^6 bytes of UTF-8 document text.
The target: the pipeline keeps >= ~80 % of the bare tokenizer's per-process throughput.

    python bench/data_prep.py                 # ~1 min on 2 cores
    python bench/data_prep.py --trials 3 --json bench/results/data_prep.json   # best of 3 (noisy machines)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Light imports only at the top: spawned worker processes re-import this file.
REPO = Path(__file__).resolve().parents[1]

BARE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
docs = json.load(open(sys.argv[1]))
encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
wall, cpu, n = time.perf_counter(), time.process_time(), 0
for i in range(0, len(docs), 512):
    n += sum(len(e.ids) for e in encode(docs[i : i + 512], add_special_tokens=False))
print(json.dumps([time.perf_counter() - wall, time.process_time() - cpu, n]))
"""


def bare(docs_file: str, tokenizer_dir: Path, threads: int) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens) of a bare encode_batch loop with `threads` tokenizer threads, in a fresh
    process (tokenizers fixes its thread pool on first use)."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    env["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"
    args = [sys.executable, "-c", BARE, docs_file, str(tokenizer_dir / "tokenizer.json")]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return tuple(json.loads(out.stdout))


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=2, help="copies of the Shakespeare corpus (5 MB each)")
    parser.add_argument("--tokenizer", default="tokenizer/shakespeare_4k")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--unit-mb", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=1, help="runs per configuration; the fastest counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from raven_titan.data.default_corpus import shakespeare_texts
    from raven_titan.data.pipeline import PrepConfig, load_or_create_plan, merge, process
    from raven_titan.data.sources import split_into_documents
    from raven_titan.data.tokenizer import load_tokenizer

    info = load_tokenizer(args.tokenizer)
    docs = [d for t in shakespeare_texts() for d in split_into_documents(t, 4000)] * args.repeat
    mb = sum(len(d.encode()) for d in docs) / 1e6
    results = {"documents": len(docs), "text_mb": round(mb, 2), "cores": os.cpu_count(), "runs": {}}
    print(f"corpus: {len(docs):,} documents, {mb:.1f} MB of text; tokenizer {info.path.name}")

    def record(
        name: str, wall: float, cpu: float, tokens: int, procs: int, extra: dict | None = None
    ) -> None:
        results["runs"][name] = {
            "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "processes": procs,
            "mb_per_s": round(mb / wall, 3),
            "mb_per_s_per_process": round(mb / wall / procs, 3),
            "tokens_per_s": round(tokens / wall),
            "tokens_per_s_per_process": round(tokens / wall / procs),
            "tokens_per_cpu_s": round(tokens / cpu),
            **(extra or {}),
        }

    with tempfile.TemporaryDirectory() as tmp:
        docs_file = Path(tmp) / "docs.json"
        docs_file.write_text(json.dumps(docs))
        for threads in (1, 2):
            wall, cpu, tokens = min(bare(str(docs_file), info.path, threads) for _ in range(args.trials))
            record(f"bare-{threads}t", wall, cpu, tokens, threads)
        src = Path(tmp) / "corpus.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        outputs = {}
        for workers in (1, 2):
            best = None
            for trial in range(args.trials):
                cfg = PrepConfig(
                    sources=[str(src)],
                    out=Path(tmp) / f"out{workers}-{trial}",
                    tokenizer=args.tokenizer,
                    seq_len=args.seq_len,
                    unit_mb=args.unit_mb,
                    workers=workers,
                    progress=False,
                )
                c0, t0 = cpu_seconds(), time.perf_counter()
                plan = load_or_create_plan(cfg, info)
                stats = process(cfg, plan, info)
                t1 = time.perf_counter()
                merge(cfg, plan, info)
                t2, c2 = time.perf_counter(), cpu_seconds()
                if best is None or t2 - t0 < best[0]:
                    best = (t2 - t0, c2 - c0, t1 - t0, t2 - t1, sum(s["tokens"] for s in stats))
                outputs[(workers, trial)] = sorted((p.name, p.read_bytes()) for p in cfg.out.rglob("*.bin"))
                shutil.rmtree(cfg.out)
                shutil.rmtree(cfg.work_dir)
            extra = {"tokenize_seconds": round(best[2], 3), "merge_seconds": round(best[3], 3)}
            record(f"pipeline-{workers}p", best[0], best[1], best[4], workers, extra)
        results["identical_output_1p_2p"] = all(o == outputs[(1, 0)] for o in outputs.values())
    runs = results["runs"]
    base, base_cpu = runs["bare-1t"]["tokens_per_s_per_process"], runs["bare-1t"]["tokens_per_cpu_s"]
    for r in runs.values():
        r["per_process_vs_bare_1t"] = round(r["tokens_per_s_per_process"] / base, 3)
        r["per_cpu_s_vs_bare_1t"] = round(r["tokens_per_cpu_s"] / base_cpu, 3)
    head = (
        f"{'run':<12} {'wall s':>7} {'CPU s':>7} {'MB/s':>6} {'MB/s/proc':>9} {'tok/s':>9} {'tok/s/proc':>10}"
    )
    print(head + f" {'tok/CPU-s':>9} {'vs bare: /proc':>14} {'/CPU-s':>6}")
    for name, r in runs.items():
        print(
            f"{name:<12} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} {r['mb_per_s']:>6.2f} "
            f"{r['mb_per_s_per_process']:>9.2f} {r['tokens_per_s']:>9,} {r['tokens_per_s_per_process']:>10,} "
            f"{r['tokens_per_cpu_s']:>9,} {r['per_process_vs_bare_1t']:>14.2f} {r['per_cpu_s_vs_bare_1t']:>6.2f}"
        )
    for w in (1, 2):
        r = runs[f"pipeline-{w}p"]
        print(
            f"pipeline-{w}p: tokenize stage {r['tokenize_seconds']:.2f} s, merge {r['merge_seconds']:.2f} s"
        )
    print(f"shards identical with 1 and 2 processes: {results['identical_output_1p_2p']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
