"""Train a byte-level BPE tokenizer (Huginn's recipe, see raven_titan/data/tokenizer.py) and save it.

Examples:
    python tokenizer/train_tokenizer.py --shakespeare --vocab-size 4096 --out tokenizer/shakespeare_4k
    python tokenizer/train_tokenizer.py --vocab-size 32768 --out my_tok a.txt b.txt docs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import raven_titan  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raven_titan.data.default_corpus import shakespeare_texts
from raven_titan.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from raven_titan.errors import RavenError


def iter_file_texts(paths: list[Path], text_key: str) -> Iterator[str]:
    """Whole .txt files; one text per line of .jsonl files (field `text_key`)."""
    for path in paths:
        if not path.is_file():
            raise RavenError(f"{path} not found")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)[text_key]
        else:
            yield path.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "files", nargs="*", type=Path, help="training texts: .txt files (whole file) or .jsonl"
    )
    parser.add_argument("--shakespeare", action="store_true", help="train on the built-in Shakespeare corpus")
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="total ids incl. 32 specials (default 4096)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (tokenizer.json, tokenizer_config.json)"
    )
    parser.add_argument("--text-key", default="text", help=".jsonl field holding the text (default: text)")
    parser.add_argument(
        "--model-max-length", type=int, default=4096, help="model_max_length in tokenizer_config"
    )
    args = parser.parse_args(argv)
    try:
        if args.shakespeare == bool(args.files):
            raise RavenError("give either --shakespeare or one or more text files")
        texts = shakespeare_texts() if args.shakespeare else iter_file_texts(args.files, args.text_key)
        start = time.perf_counter()
        tok = train_tokenizer(texts, args.vocab_size)
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
