"""Turn plain-text (.txt) and JSON-lines (.jsonl) files into a prepared dataset folder for training.

Each .txt file is cut into documents of whole paragraphs (>= --chunk-chars characters; 0 = one document per
file); each line of a .jsonl file is one document (field --text-key). Documents are tokenized, shuffled
(--seed), split into train/val by --val-fraction of the tokens (never splitting a document), packed into rows
of --seq-len + 1 tokens (--packing carry|drop) and written atomically to --out. Train with
`--data.dataset <out> --data.tokenizer <same tokenizer> --training.seq_len <same seq_len>`.

Example:
    python data_prep/prepare_text.py --out data/mytext-L256 --seq-len 256 notes/*.txt corpus.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import raven_titan  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raven_titan.data.prepare import Progress, build_dataset, split_into_documents
from raven_titan.data.shards import PackedRows
from raven_titan.data.tokenizer import load_tokenizer
from raven_titan.errors import RavenError


def read_documents(paths: list[Path], text_key: str, chunk_chars: int) -> list[str]:
    docs: list[str] = []
    for path in paths:
        if not path.is_file():
            raise RavenError(f"{path} not found")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise RavenError(f"{path}:{lineno}: no string field {text_key!r} ({e})") from None
                    if not isinstance(text, str):
                        raise RavenError(f"{path}:{lineno}: field {text_key!r} is not a string")
                    if text.strip():
                        docs.append(text)
        else:
            text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
            if chunk_chars > 0:
                docs.extend(split_into_documents(text, chunk_chars))
            elif text.strip():
                docs.append(text)
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="input .txt / .jsonl files")
    parser.add_argument("--out", type=Path, required=True, help="output dataset folder (must not exist)")
    parser.add_argument("--tokenizer", default="tokenizer/shakespeare_4k", help="folder with tokenizer.json")
    parser.add_argument(
        "--seq-len", type=int, default=256, help="training sequence length (rows hold seq_len+1)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens held out for val")
    parser.add_argument("--seed", type=int, default=1597, help="document shuffle seed")
    parser.add_argument("--packing", choices=["carry", "drop"], default="carry", help="packing policy")
    parser.add_argument("--text-key", default="text", help=".jsonl field holding the document text")
    parser.add_argument("--chunk-chars", type=int, default=4000, help=".txt: min characters per document")
    args = parser.parse_args(argv)
    try:
        if args.seq_len < 1 or not 0 <= args.val_fraction <= 0.5:
            raise RavenError("--seq-len must be >= 1 and --val-fraction within [0, 0.5]")
        info = load_tokenizer(args.tokenizer)
        docs = read_documents(args.files, args.text_key, args.chunk_chars)
        if not docs:
            raise RavenError("the input files hold no text")
        progress = Progress()
        out = build_dataset(
            docs,
            args.out,
            info,
            seq_len=args.seq_len,
            val_fraction=args.val_fraction,
            seed=args.seed,
            policy=args.packing,
            meta={"name": args.out.name, "sources": [str(p) for p in args.files]},
            progress=progress,
        )
        rows = {s: len(PackedRows(out / s)) for s in ("train", "val")}
    except RavenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress.finish(
        f"wrote {out}: {rows['train']} train + {rows['val']} val rows of {args.seq_len + 1} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
