"""Train a byte-level BPE tokenizer with Huginn's recipe (spec section 9; raven_titan/data/tokenizer.py) and save
tokenizer.json + tokenizer_config.json (bos/eos/pad, Huginn's chat template), loadable by `tokenizers` and by
`transformers` (PreTrainedTokenizerFast / AutoTokenizer).

Defaults follow the recipe: 65,536 ids in all, the 32 special tokens at 65504..65535 (<|begin_text|> BOS 65504,
<|end_text|> EOS 65505, <|begin_header|> 65506, <|end_header|> 65507, <|end_turn|> 65508, <|pad|> 65509, ...),
the "aeolian" pre-tokenizer (single digits isolated), Huginn's 2,855 manual tokens (--manual-tokens huginn),
at most 131,072 documents sampled per source (--max-docs-per-source; a seeded uniform sample) and each cut to
32,768 characters (--max-chars).

Sources (positional; each a file, a folder or a glob; the sampling limit applies per source): .txt (paragraph
documents of >= --chunk-chars characters), .jsonl / .jsonl.gz / .parquet (field --text-field, or a chat in
--chat-field whose message contents are joined by newlines, as Huginn's tokenizer sample did).

Examples:
    python tokenizer/train_tokenizer.py --out my_tok web/*.jsonl.gz books/ code.parquet
    python tokenizer/train_tokenizer.py --vocab-size 8192 --manual-tokens whitespace --out small_tok notes/
    python tokenizer/train_tokenizer.py --shakespeare --vocab-size 4096 --manual-tokens none \\
        --out tokenizer/shakespeare_4k   # reproduces the committed default tokenizer
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

try:
    import raven_titan  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raven_titan.data.default_corpus import shakespeare_texts
from raven_titan.data.sources import ReadStats, plan_units, read_unit
from raven_titan.data.tokenizer import MANUAL_TOKEN_SETS, load_tokenizer, save_tokenizer, train_tokenizer
from raven_titan.errors import RavenError


def sample_source(
    source: str,
    limit: int,
    seed: int,
    stats: ReadStats,
    text_field: str = "text",
    chat_field: str = "messages",
    chunk_chars: int = 4000,
    max_chars: int = 32768,
) -> list[str]:
    """Up to `limit` documents of one source (all if `limit` is 0): a uniform sample (reservoir sampling with
    `seed`, so the same files give the same sample), each cut to `max_chars` characters (0: uncut)."""
    rng = random.Random(seed)
    kept: list[str] = []
    seen = 0
    for unit in plan_units([source], 2**62, (text_field, chat_field)):
        for doc in read_unit(unit, stats, text_field, chat_field, chunk_chars):
            text = doc if isinstance(doc, str) else "\n".join(content for _, content in doc)
            if max_chars:
                text = text[:max_chars]
            if not limit or len(kept) < limit:
                kept.append(text)
            else:
                j = rng.randrange(seen + 1)
                if j < limit:
                    kept[j] = text
            seen += 1
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sources", nargs="*", help="training text: files, folders or globs")
    parser.add_argument(
        "--shakespeare",
        action="store_true",
        help="train on the built-in Shakespeare corpus (whole texts, no sampling)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=65536, help="total ids incl. 32 specials (65536)")
    parser.add_argument(
        "--manual-tokens", choices=MANUAL_TOKEN_SETS, default="huginn", help="manual token set (huginn)"
    )
    parser.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    parser.add_argument("--chat-field", default="messages", help="JSONL/Parquet field holding a chat")
    parser.add_argument("--chunk-chars", type=int, default=4000, help=".txt: min characters per document")
    parser.add_argument(
        "--max-docs-per-source", type=int, default=2**17, help="sample size per source (0: all)"
    )
    parser.add_argument(
        "--max-chars", type=int, default=8 * 4096, help="cut documents to this length (0: no)"
    )
    parser.add_argument("--seed", type=int, default=233, help="sampling seed")
    parser.add_argument("--model-max-length", type=int, default=4096, help="model_max_length in the config")
    args = parser.parse_args(argv)
    try:
        if args.shakespeare == bool(args.sources):
            raise RavenError("give either --shakespeare or one or more sources")
        start = time.perf_counter()
        if args.shakespeare:
            texts = shakespeare_texts()
        else:
            texts, stats = [], ReadStats()
            for i, source in enumerate(args.sources):
                sample = sample_source(
                    source,
                    args.max_docs_per_source,
                    args.seed + i,
                    stats,
                    args.text_field,
                    args.chat_field,
                    args.chunk_chars,
                    args.max_chars,
                )
                print(f"{source}: {len(sample):,} documents", file=sys.stderr)
                texts += sample
            skipped = {
                k: getattr(stats, k) for k in ("undecodable", "malformed", "empty") if getattr(stats, k)
            }
            if skipped:
                print(f"skipped {skipped} (first: {stats.first_problem})", file=sys.stderr)
            if not texts:
                raise RavenError("the sources hold no text")
        tok = train_tokenizer(texts, args.vocab_size, args.manual_tokens)
        save_tokenizer(tok, args.out, model_max_length=args.model_max_length)
        info = load_tokenizer(args.out.resolve())
    except RavenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"saved {info.path} (vocab {info.vocab_size}, bos {info.bos_id}, eos {info.eos_id}, "
        f"pad {info.pad_id}, fingerprint {info.fingerprint}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
