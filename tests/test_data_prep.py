"""Corpus preparation pipeline (data_prep/prepare.py): packing invariants, determinism across worker counts and
machines, resume, planted duplicates, bad input, chat rendering, Parquet, and the start-up checks on its output."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from raven_titan.config.job_config import Data
from raven_titan.data.dedup import EXACT, NEAR, MinHasher, duplicate_codes
from raven_titan.data.default_corpus import resolve_dataset, shakespeare_texts
from raven_titan.data.pipeline import PrepConfig, run, slurm_rank_world
from raven_titan.data.shards import PackedRows
from raven_titan.data.sources import ReadStats, plan_units, read_unit
from raven_titan.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from raven_titan.data.units import unit_file
from raven_titan.errors import RavenError

REPO = Path(__file__).resolve().parents[1]
TOK = "tokenizer/shakespeare_4k"


@pytest.fixture(scope="module")
def info():
    return load_tokenizer(TOK)


@pytest.fixture(scope="module")
def words() -> list[str]:
    return sorted(set(re.findall(r"[A-Za-z']+", shakespeare_texts(max_plays=1)[0])))


def make_docs(words: list[str], n: int, seed: int, lo: int = 20, hi: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(lo, hi))) + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def prep(tmp_path: Path, sources, name: str = "out", stage: str = "all", **kw) -> Path:
    kw = {"seq_len": 63, "workers": 0, "val_fraction": 0.2, "unit_mb": 0.01, **kw}
    cfg = PrepConfig(
        sources=[str(s) for s in sources], out=tmp_path / name, tokenizer=TOK, progress=False, **kw
    )
    return run(cfg, stage)


def rows_of(folder: Path, split: str) -> np.ndarray:
    data = PackedRows(folder / split)
    return np.stack([data.row(i) for i in range(len(data))]) if len(data) else np.zeros((0, data.row_len))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def tree_bytes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", REPO / "data_prep" / "prepare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


# ---- packing ---------------------------------------------------------------------------------------------


def test_carry_packing_loses_only_one_partial_row_per_split(tmp_path, info, words):
    docs = make_docs(words, 150, seed=1)
    srcs = [write_jsonl(tmp_path / "a.jsonl", docs[:90]), write_jsonl(tmp_path / "b.jsonl", docs[90:])]
    out = prep(tmp_path, srcs, packing="carry")
    m = manifest(out)
    assert m["units"] > 4  # several units: packing continues across unit boundaries
    wrapped = Counter()
    for d in docs:
        wrapped.update([info.bos_id, *info.tokenizer.encode(d).ids, info.eos_id])
    got = Counter()
    for split in ("train", "val"):
        rows = rows_of(out, split)
        assert rows.shape[1] == 64 and len(rows) == m["rows"][split] > 0
        got.update(rows.reshape(-1).tolist())
    assert not got - wrapped  # every token comes from a wrapped document; nothing is duplicated
    lost = sum(wrapped.values()) - sum(got.values())
    assert 0 <= lost < 2 * 64  # only the final partial row of each split is dropped
    assert m["documents"]["train"] + m["documents"]["val"] == 150


def test_drop_packing_rows_start_at_documents_and_splits_are_disjoint(tmp_path, info, words):
    docs = make_docs(words, 150, seed=2, lo=5, hi=40)
    out = prep(tmp_path, [write_jsonl(tmp_path / "a.jsonl", docs)], packing="drop", seq_len=127)
    decode = info.tokenizer.decode
    seen: dict[str, list[str]] = {"train": [], "val": []}
    for split in seen:
        rows = rows_of(out, split)
        assert len(rows) > 0 and (rows[:, 0] == info.bos_id).all()
        for row in rows.tolist():
            pieces = " ".join(map(str, row)).split(str(info.bos_id))[1:]
            for k, piece in enumerate(pieces):
                ids = [int(t) for t in piece.split()]
                if ids and ids[-1] == info.eos_id:
                    text = decode(ids[:-1])
                    assert text in docs
                    seen[split].append(text)
                else:  # only the last document of a row is cut ("incinerated" tail)
                    assert k == len(pieces) - 1 and any(d.startswith(decode(ids)) for d in docs)
    assert not set(seen["train"]) & set(seen["val"])
    assert len(seen["train"]) == len(set(seen["train"]))  # no document is used twice


def test_jsonl_byte_ranges_partition_the_lines(tmp_path, words):
    docs = make_docs(words, 40, seed=3, lo=1, hi=30)
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    for unit_bytes in (1, 7, 100, 333, 10**6):
        units = plan_units([str(src)], unit_bytes)
        got = [d for u in units for d in read_unit(u, ReadStats())]
        assert got == docs, unit_bytes


# ---- determinism, resume, clusters ---------------------------------------------------------------------


def test_byte_identical_for_any_number_of_workers_or_machines(tmp_path, words):
    docs = make_docs(words, 200, seed=4)
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:120])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[120:] + docs[:5])  # with exact copies
    (tmp_path / "in" / "c.txt").write_text("\n\n".join(docs[10:40]))
    cli = load_cli()
    common = [str(tmp_path / "in"), "--seq-len", "63", "--unit-mb", "0.01", "--dedup", "near", "--quiet"]
    common += ["--val-fraction", "0.2", "--rows-per-file", "50", "--tokenizer", TOK]
    assert cli.main([*common, "--out", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    for rank in (1, 0):  # two "machines", then the merge
        args = ["--rank", str(rank), "--world-size", "2", "--workers", "0", "--stage", "process"]
        assert cli.main([*common, "--out", str(tmp_path / "m2"), *args]) == 0
    assert not (tmp_path / "m2").exists()
    assert cli.main([*common, "--out", str(tmp_path / "m2"), "--stage", "merge"]) == 0
    reference = tree_bytes(tmp_path / "w1")
    assert len([f for f in reference if f.endswith(".bin")]) > 2
    assert tree_bytes(tmp_path / "w2") == reference
    assert tree_bytes(tmp_path / "m2") == reference
    assert cli.main([*common, "--out", str(tmp_path / "s2"), "--workers", "0", "--seed", "7"]) == 0
    assert tree_bytes(tmp_path / "s2")["train/00000.bin"] != reference["train/00000.bin"]


def test_rerun_skips_finished_units_and_refuses_other_settings(tmp_path, words):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(words, 120, seed=5))
    prep(tmp_path, [src], rank=0, world_size=3, stage="process")
    work = tmp_path / "out.work"
    done = {p: p.stat().st_mtime_ns for p in (work / "units").glob("*.npz")}
    assert 0 < len(done)
    with pytest.raises(RavenError, match="not tokenized yet"):
        prep(tmp_path, [src], stage="merge")
    (work / "units" / ".000001.npz.tmp-host-1").write_bytes(b"partial")  # a killed worker's leftover
    out = prep(tmp_path, [src])
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished units were not redone
    assert not list((work / "units").glob(".*"))
    assert tree_bytes(out) == tree_bytes(prep(tmp_path, [src], name="fresh"))
    before = tree_bytes(out)
    assert prep(tmp_path, [src]) == out and tree_bytes(out) == before  # complete: nothing to do
    with pytest.raises(RavenError, match="another preparation.*text_field"):
        prep(tmp_path, [src], name="out2", work_dir=work, text_field="body")


def test_slurm_array_gives_rank_and_world(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert slurm_rank_world() == (1, 3)
    with pytest.raises(RavenError, match="rank 3 outside"):
        PrepConfig(sources=["x"], out=Path("y"), rank=3, world_size=3)


# ---- dedup -----------------------------------------------------------------------------------------------


def test_planted_exact_and_near_duplicates_removed(tmp_path, words):
    base = make_docs(words, 60, seed=6, lo=150, hi=200)
    rng = random.Random(0)
    near = []
    for d in base[3:6]:
        w = d.split()
        for i in rng.sample(range(len(w)), 2):
            w[i] = rng.choice(words)
        near.append(" ".join(w))
    near.append(base[6] + " And so farewell.")
    srcs = [write_jsonl(tmp_path / "a.jsonl", base), write_jsonl(tmp_path / "b.jsonl", base[:3] + near)]
    by_source = {s["source"]: s for s in manifest(prep(tmp_path, srcs, dedup="near"))["sources"]}
    a, b = by_source[str(srcs[0])], by_source[str(srcs[1])]
    assert (a["exact_duplicates"], a["near_duplicates"]) == (0, 0)  # no false positive among 60 originals
    assert (b["exact_duplicates"], b["near_duplicates"]) == (3, 4)  # the later copies go
    exact_only = {s["source"]: s for s in manifest(prep(tmp_path, srcs, "ex", dedup="exact"))["sources"]}
    assert (exact_only[str(srcs[1])]["exact_duplicates"], exact_only[str(srcs[1])]["near_duplicates"]) == (
        3,
        0,
    )
    kept = manifest(prep(tmp_path, srcs, "none"))["documents"]
    assert kept["train"] + kept["val"] == 67


def test_minhash_estimates_jaccard_and_cluster_rule():
    mh = MinHasher(ngram=1, bands=32, rows=8)
    a, b = np.arange(0, 1000), np.arange(200, 1200)  # Jaccard 800 / 1200
    agree = float((mh.signature(a) == mh.signature(b)).mean())
    assert abs(agree - 2 / 3) < 0.08
    assert (mh.band_keys(a) == MinHasher(ngram=1, bands=32, rows=8).band_keys(a)).all()  # seeded, not salted
    hashes = np.array([1, 2, 1, 3, 4], dtype=np.uint64)
    bands = np.array([[10, 11], [12, 13], [10, 11], [14, 11], [15, 16]], dtype=np.uint64)
    assert duplicate_codes(hashes, bands, True, True).tolist() == [0, 0, EXACT, NEAR, 0]
    assert duplicate_codes(hashes, None, True, False).tolist() == [0, 0, EXACT, 0, 0]


# ---- input formats and bad input -----------------------------------------------------------------------


def test_bad_input_is_counted_and_skipped(tmp_path, words):
    good = make_docs(words, 30, seed=7)
    lines = [json.dumps({"text": d}).encode() for d in good[:20]]
    lines[3:3] = [
        b'{"text": "caf\xe9 latin-1"}',  # not UTF-8
        b"not json",
        b'{"other": "no text field"}',
        b'{"text": 12}',
        b'{"text": "   \\n "}',  # empty
        b'{"text": "lone \\ud800 surrogate"}',  # valid JSON, not encodable text
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as fh:
        fh.write(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in good[20:]) + b"\xff\xfe\n")
    (tmp_path / "c.txt").write_bytes(b"A first paragraph.\n\n\xc3\x28 broken line\nSecond paragraph.\n")
    out = prep(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.txt"], seq_len=15)
    got = {Path(s["source"]).name: s for s in manifest(out)["sources"]}
    pick = ("documents", "undecodable", "malformed", "empty")
    assert [got["a.jsonl"][k] for k in pick] == [20, 2, 3, 1]
    assert [got["b.jsonl.gz"][k] for k in pick] == [10, 1, 0, 0]
    assert [got["c.txt"][k] for k in pick] == [1, 1, 0, 0]


def test_chat_records_rendered_with_special_tokens(tmp_path, info):
    chat = [{"role": "user", "content": " Hi <|end_text|> "}, {"from": "gpt", "value": "Hello."}]
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": chat}) + "\n")
    prep(tmp_path, [src], stage="process")
    with np.load(unit_file(tmp_path / "out.work", 0)) as z:
        tokens = z["tokens"].tolist()
    tok = load_tokenizer(TOK).tokenizer
    tok.encode_special_tokens = True
    sid = tok.token_to_id
    expected = [sid("<|begin_header|>"), *tok.encode("user").ids, sid("<|end_header|>")]
    expected += [*tok.encode("\n\nHi <|end_text|>").ids, sid("<|end_turn|>"), sid("<|begin_header|>")]
    expected += [*tok.encode("Huginn").ids, sid("<|end_header|>"), *tok.encode("\n\nHello.").ids]
    expected += [sid("<|end_turn|>")]
    assert tokens == expected
    assert info.eos_id not in tokens  # a special-token name inside a message stays text


def test_parquet_sources_split_by_row_groups(tmp_path, words):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = make_docs(words, 200, seed=8)
    chats = [[{"role": "user", "content": d}] for d in docs[:3]]
    table = pa.table({"text": docs + [None] * 3, "messages": [None] * 200 + chats})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=50)
    units = plan_units([str(tmp_path / "a.parquet")], 1, ("text", "messages"))
    assert [(u.start, u.end) for u in units] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    out = prep(tmp_path, [tmp_path / "a.parquet"], unit_mb=1e-9)
    assert manifest(out)["sources"][0]["documents"] == 203
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(RavenError, match=r"b.parquet has none of the columns \['text', 'messages'\]"):
        prep(tmp_path, [tmp_path / "b.parquet"], name="bad")


# ---- start-up checks on prepared data ------------------------------------------------------------------


def test_corrupt_shards_and_vocabulary_mismatch_refused_at_startup(tmp_path, info, words):
    import shutil

    src = write_jsonl(tmp_path / "a.jsonl", make_docs(words, 100, seed=9))
    out = prep(tmp_path, [src], rows_per_file=20)
    assert resolve_dataset(Data(dataset=str(out), cache_dir=str(tmp_path)), 63, info) == out

    def variant(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(out, copy)
        return copy

    flipped = variant("flipped")
    raw = bytearray((flipped / "train" / "00001.bin").read_bytes())
    raw[8] ^= 1
    (flipped / "train" / "00001.bin").write_bytes(bytes(raw))
    with pytest.raises(RavenError, match=r"train/00001.bin: checksum mismatch"):
        resolve_dataset(Data(dataset=str(flipped), cache_dir=str(tmp_path)), 63, info)

    cut = variant("cut")
    victim = cut / "val" / "00000.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(RavenError, match=r"val/00000.bin is truncated"):
        resolve_dataset(Data(dataset=str(cut), cache_dir=str(tmp_path)), 63, info)

    big = variant("big")
    victim = big / "train" / "00002.bin"
    data = np.fromfile(victim, dtype="<u2")
    data[70] = 5000
    data.tofile(victim)
    index_file = big / "train" / "index.json"
    index = json.loads(index_file.read_text())
    index["files"][2]["sha256"] = hashlib.sha256(victim.read_bytes()).hexdigest()
    index_file.write_text(json.dumps(index))
    with pytest.raises(RavenError, match=r"00002.bin: row 1 holds token id 5000 >= vocabulary size 4096"):
        resolve_dataset(Data(dataset=str(big), cache_dir=str(tmp_path)), 63, info)

    other = load_tokenizer(save_tokenizer(train_tokenizer(shakespeare_texts(1), 1024), tmp_path / "tok1k"))
    with pytest.raises(RavenError, match="another tokenizer"):
        resolve_dataset(Data(dataset=str(out), cache_dir=str(tmp_path)), 63, other)
    anonymous = variant("anonymous")  # no fingerprint recorded: the vocabulary sizes still disagree
    for split in ("train", "val"):
        f = anonymous / split / "index.json"
        f.write_text(f.read_text().replace(info.fingerprint, ""))
    with pytest.raises(RavenError, match="vocabulary of 4096 ids but the tokenizer/model has 1024"):
        resolve_dataset(Data(dataset=str(anonymous), cache_dir=str(tmp_path)), 63, other)


def test_worker_failure_reaches_the_caller(tmp_path, info, words):
    from raven_titan.data.pipeline import Plan, load_or_create_plan, process

    src = write_jsonl(tmp_path / "a.jsonl", make_docs(words, 20, seed=10))
    cfg = PrepConfig(sources=[str(src)], out=tmp_path / "out", tokenizer=TOK, workers=1, progress=False)
    plan = load_or_create_plan(cfg, info)
    stale = Plan({**plan.settings, "tokenizer_fingerprint": "0" * 16}, plan.units)
    with pytest.raises(RavenError, match="changed during preparation"):
        process(cfg, stale, info)  # raised in the spawned worker, re-raised here (no hanging pool)
