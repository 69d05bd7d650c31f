"""PackedRows.validate: one shared read per file, parallel threads, and the record of verified files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import raven_titan.data.shards as shards
from raven_titan.data.shards import PackedRows, write_split
from raven_titan.errors import RavenError


def make_split(path: Path, num_rows: int = 10, rows_per_file: int = 3, vocab: int = 1000) -> PackedRows:
    rows = np.random.default_rng(0).integers(0, 900, size=(num_rows, 9))
    write_split(path, rows, vocab_size=vocab, rows_per_file=rows_per_file)
    return PackedRows(path)


@pytest.fixture
def checked(monkeypatch) -> list[str]:
    """Names of the files whose contents validate reads (a spy on shards._check_contents)."""
    names: list[str] = []
    real = shards._check_contents

    def spy(path, *args):
        names.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(shards, "_check_contents", spy)
    return names


def flip_byte(path: Path, offset: int = 5, keep_mtime: bool = False) -> None:
    """Change one byte (still a small token id); the mtime is kept, or moved one second on."""
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    mtime = stat.st_mtime_ns if keep_mtime else stat.st_mtime_ns + 10**9
    os.utime(path, ns=(stat.st_atime_ns, mtime))


def test_second_validate_skips_recorded_files(tmp_path, checked, caplog):
    data = make_split(tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="raven_titan.data.shards"):
        data.validate(1000, record_dir=tmp_path / "rec")
    assert sorted(checked) == ["00000.bin", "00001.bin", "00002.bin", "00003.bin"]
    assert "verified 4 files" in caplog.text and "MB/s" in caplog.text
    (record_file,) = (tmp_path / "rec").glob("*.json")
    assert sorted(json.loads(record_file.read_text())) == sorted(checked)
    checked.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raven_titan.data.shards"):
        data.validate(1000, record_dir=tmp_path / "rec")
    assert checked == [] and "verified" not in caplog.text
    data.validate(1000)  # without a record every file is read again
    assert len(checked) == 4


def test_record_trusts_size_and_mtime_by_design(tmp_path):
    data = make_split(tmp_path / "s")
    data.validate(1000, record_dir=tmp_path / "rec")
    flip_byte(tmp_path / "s" / "00002.bin", keep_mtime=True)  # same size, mtime restored: not noticed
    data.validate(1000, record_dir=tmp_path / "rec")
    with pytest.raises(RavenError, match="00002.bin: checksum mismatch"):
        data.validate(1000)  # the full check without the record still catches it


def test_modified_file_is_checked_again(tmp_path, checked):
    data = make_split(tmp_path / "s")
    data.validate(1000, record_dir=tmp_path / "rec")
    checked.clear()
    flip_byte(tmp_path / "s" / "00001.bin")
    with pytest.raises(RavenError, match="00001.bin: checksum mismatch"):
        data.validate(1000, record_dir=tmp_path / "rec")
    assert "00001.bin" in checked and "00000.bin" not in checked


def test_failing_file_is_not_recorded(tmp_path, checked):
    data = make_split(tmp_path / "s")
    flip_byte(tmp_path / "s" / "00002.bin")
    with pytest.raises(RavenError, match="00002.bin: checksum mismatch"):
        data.validate(1000, record_dir=tmp_path / "rec", threads=1)
    (record_file,) = (tmp_path / "rec").glob("*.json")
    assert sorted(json.loads(record_file.read_text())) == ["00000.bin", "00001.bin"]  # passed before it
    checked.clear()
    with pytest.raises(RavenError, match="00002.bin: checksum mismatch"):
        data.validate(1000, record_dir=tmp_path / "rec", threads=1)
    assert checked[0] == "00002.bin" and not {"00000.bin", "00001.bin"} & set(
        checked
    )  # recorded ones skipped


def test_larger_vocab_skips_smaller_rechecks(tmp_path, checked):
    data = make_split(tmp_path / "s")
    data.validate(2000, record_dir=tmp_path / "rec")
    checked.clear()
    data.validate(3000, record_dir=tmp_path / "rec")
    data.validate(2000, record_dir=tmp_path / "rec")
    assert checked == []
    data.validate(1000, record_dir=tmp_path / "rec")  # a stricter range than recorded
    assert len(checked) == 4
    (record_file,) = (tmp_path / "rec").glob("*.json")
    assert {e["vocab_size"] for e in json.loads(record_file.read_text()).values()} == {1000}


def test_corrupt_record_is_ignored(tmp_path, checked):
    data = make_split(tmp_path / "s")
    data.validate(1000, record_dir=tmp_path / "rec")
    (record_file,) = (tmp_path / "rec").glob("*.json")
    for garbage in (b"\xff{not json", b"[1, 2]", b'{"00000.bin": 3, "00001.bin": {"vocab_size": "x"}}'):
        record_file.write_bytes(garbage)
        checked.clear()
        data.validate(1000, record_dir=tmp_path / "rec")
        assert len(checked) == 4
        assert sorted(json.loads(record_file.read_text())) == sorted(checked)  # rewritten whole


def test_unwritable_record_dir_only_warns(tmp_path, checked, caplog):
    data = make_split(tmp_path / "s")
    (tmp_path / "file").write_text("")  # a record dir below a regular file cannot be created, even by root
    with caplog.at_level(logging.WARNING, logger="raven_titan.data.shards"):
        data.validate(1000, record_dir=tmp_path / "file" / "rec")
        data.validate(1000, record_dir=tmp_path / "file" / "rec")
    assert "could not write the data verification record" in caplog.text
    assert len(checked) == 8


def test_parallel_reports_first_bad_file_in_file_order(tmp_path, monkeypatch):
    make_split(tmp_path / "s", num_rows=18)  # 6 files
    flip_byte(tmp_path / "s" / "00001.bin")
    flip_byte(tmp_path / "s" / "00004.bin")
    real = shards._check_contents
    later_failed = threading.Event()

    def slow_first(path, *args):  # 00001 fails only after 00004 has failed
        if path.name == "00001.bin":
            later_failed.wait(5)
        try:
            return real(path, *args)
        finally:
            if path.name == "00004.bin":
                later_failed.set()

    monkeypatch.setattr(shards, "_check_contents", slow_first)
    for threads in (1, 4):
        later_failed.clear()
        with pytest.raises(RavenError, match="00001.bin: checksum mismatch"):
            PackedRows(tmp_path / "s").validate(1000, threads=threads)


def test_bad_token_row_in_a_late_block(tmp_path, monkeypatch):
    make_split(tmp_path / "s", num_rows=12, rows_per_file=12)
    victim = tmp_path / "s" / "00000.bin"
    raw = np.fromfile(victim, dtype="<u2")
    raw[9 * 9 + 4] = 60000  # row 9, token 4
    raw.tofile(victim)
    monkeypatch.setattr(shards, "VERIFY_BLOCK_BYTES", 50)  # 2 rows of 18 bytes per block
    data = PackedRows(tmp_path / "s")
    message = "00000.bin: row 9 holds token id 60000 >= vocabulary size 1000"
    with pytest.raises(RavenError, match=message):
        data.validate(1000, check_checksums=False, record_dir=tmp_path / "rec")
    data.files[0] = (victim, 12, hashlib.sha256(victim.read_bytes()).hexdigest())  # checksum now matches
    with pytest.raises(RavenError, match=message):
        data.validate(1000, record_dir=tmp_path / "rec")  # hash and token range from the same blocks
    assert not list((tmp_path / "rec").glob("*.json"))


def test_parts_share_the_reading_and_their_records_add_up(tmp_path, checked):
    data = make_split(tmp_path / "s", num_rows=15)  # 5 files
    flip_byte(tmp_path / "s" / "00003.bin")
    data.validate(1000, record_dir=tmp_path / "rec", part=(0, 2))  # files 0, 2, 4: fine
    assert sorted(checked) == ["00000.bin", "00002.bin", "00004.bin"]
    with pytest.raises(RavenError, match="00003.bin: checksum mismatch"):
        data.validate(1000, record_dir=tmp_path / "rec", part=(1, 2))
    assert len(list((tmp_path / "rec").glob("*.part*of2.json"))) == 2  # 00001 passed before 00003 failed
    checked.clear()
    with pytest.raises(RavenError, match="00003.bin"):
        data.validate(1000, record_dir=tmp_path / "rec")  # a whole check trusts both parts' records
    assert checked == ["00003.bin"]
