"""Prepare a training dataset from raw text at scale: tokenize, deduplicate, pack, split, shuffle, shard.

Sources (positional; each a file, a folder or a glob): .txt (cut into paragraph documents of >= --chunk-chars
characters), .jsonl / .jsonl.gz (one record per line; the string field --text-field, or a chat in the list field
--chat-field rendered with Huginn's chat template), .parquet (same fields as columns; needs pyarrow).

Every document is wrapped in <|begin_text|> ... <|end_text|> and packed into rows of --seq-len + 1 tokens
(--packing carry: document tails continue in the next row; drop: Huginn's policy, every row starts at a
document and the tail beyond a row is discarded). Output: the dataset folder format that training reads
(train/ and val/ with .bin files and index.json, plus dataset.json), byte-identical for a given --seed
whatever --workers or the number of machines.

Stages: plan + process (tokenize work units in --workers processes; resumable: a rerun skips finished units)
then merge (dedup, split, pack, global shuffle, write). A plain run does both. On a cluster, run the same
command as a job array (rank/world size from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, or --rank /
--world-size), then once with --stage merge. --stage report prints per-source token counts.

The options that shape the units (sources, --tokenizer, --text-field, --chat-field, --chunk-chars, --unit-mb,
--dedup near and its --minhash-*) must be the same in every run on a work dir; the merge options (--seq-len,
--packing, --val-fraction, --seed, --dedup none/exact, --rows-per-file) can differ, so one tokenization can be
merged into several datasets (another --out, the same --work-dir).

Examples:
    python data_prep/prepare.py --out data/web-L4096 --seq-len 4096 --tokenizer my_tok web/ books/*.txt
    # cluster: sbatch --array=0-63 (each task: the same command with --stage process), then once:
    python data_prep/prepare.py --out data/web-L4096 --seq-len 4096 --tokenizer my_tok --stage merge web/ books/*.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Keep the imports above light: worker processes (spawned) re-import this file.


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "sources", nargs="+", help="input files, folders or globs (.txt .jsonl .jsonl.gz .parquet)"
    )
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--tokenizer", default="tokenizer/shakespeare_4k", help="folder with tokenizer.json")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length; rows hold seq_len + 1")
    p.add_argument("--packing", choices=["carry", "drop"], default="carry", help="document-tail policy")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out as val")
    p.add_argument("--seed", type=int, default=1597, help="split, document and row shuffle seed")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding a document's text")
    p.add_argument("--chat-field", default="messages", help="JSONL/Parquet field holding a chat (list)")
    p.add_argument(
        "--chunk-chars", type=int, default=4000, help=".txt: min characters per document (0: file)"
    )
    p.add_argument(
        "--dedup", choices=["none", "exact", "near"], default="none", help="near = exact + MinHash"
    )
    p.add_argument("--minhash-ngram", type=int, default=5, help="tokens per shingle")
    p.add_argument("--minhash-bands", type=int, default=14, help="LSH bands")
    p.add_argument("--minhash-rows", type=int, default=8, help="hashes per band")
    p.add_argument("--unit-mb", type=float, default=64.0, help="size of a work unit (MiB of input)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per .bin file (default: ~256 MiB)")
    p.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores; 0: inline)"
    )
    p.add_argument("--rank", type=int, default=None, help="this machine's rank (default: SLURM array task)")
    p.add_argument("--world-size", type=int, default=None, help="machines (default: SLURM array task count)")
    p.add_argument("--work-dir", type=Path, default=None, help="unit files and plan (default: <out>.work)")
    p.add_argument(
        "--stage", choices=["all", "process", "merge", "report"], default="all", help="what to run"
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import raven_titan  # noqa: F401
    except ModuleNotFoundError:  # run from a checkout without installing the package
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from raven_titan.data.pipeline import PrepConfig, default_workers, run, slurm_rank_world
    from raven_titan.errors import RavenError

    rank, world = slurm_rank_world()
    try:
        cfg = PrepConfig(
            sources=args.sources,
            out=args.out,
            tokenizer=args.tokenizer,
            seq_len=args.seq_len,
            packing=args.packing,
            val_fraction=args.val_fraction,
            seed=args.seed,
            text_field=args.text_field,
            chat_field=args.chat_field,
            chunk_chars=args.chunk_chars,
            dedup=args.dedup,
            minhash_ngram=args.minhash_ngram,
            minhash_bands=args.minhash_bands,
            minhash_rows=args.minhash_rows,
            unit_mb=args.unit_mb,
            rows_per_file=args.rows_per_file,
            workers=default_workers() if args.workers is None else args.workers,
            rank=rank if args.rank is None else args.rank,
            world_size=world if args.world_size is None else args.world_size,
            work_dir=args.work_dir,
            progress=not args.quiet,
        )
        run(cfg, args.stage)
    except RavenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
