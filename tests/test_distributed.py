"""Data parallelism on CPU (gloo, 2 processes under torchrun): every layout reproduces the one-process run
with the same global batch, and FSDP's collectives per step do not grow with the sampled depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
    "--training.seq_len", "32", "--training.global_batch_size", "8", "--training.steps", "10",
    "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_steps", "3", "--validation.no-enable",
    "--metrics.log_freq", "1", "--training.mixed_precision_param", "float32", "--parallelism.timeout_seconds", "120",
]  # fmt: skip
ENV = {
    **os.environ,
    "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(REPO),
}


def torchrun(
    *args: str, target: tuple[str, ...] = ("-m", "raven_titan.train")
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *target,
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return [*TINY, "--data.cache_dir", str(cache)]


@pytest.fixture(scope="module")
def reference(common, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    out = subprocess.run(
        [sys.executable, "-m", "raven_titan.train", *common, "--training.local_batch_size", "8",
         "--job.dump_folder", str(run)],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ref = losses(run)
    assert len(ref) == 10
    return ref


@pytest.mark.parametrize(
    "layout",
    [
        ["--parallelism.data_parallel_mode", "fsdp"],  # FSDP, mesh 1 x 2
        ["--parallelism.data_parallel_replicate_degree", "2"],  # HSDP, mesh 2 x 1
        ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.replicate_reduce", "chunked"],
        ["--parallelism.data_parallel_mode", "chunked", "--parallelism.chunk_size_mb", "0.05"],
        [
            "--parallelism.data_parallel_mode",
            "chunked",
            "--parallelism.overlap_reduce",
            "--training.local_batch_size",
            "2",
        ],  # with gradient accumulation 2
    ],  # fmt: skip
    ids=["fsdp-1x2", "hsdp-2x1", "hsdp-2x1-chunked-replicate", "chunked-dp", "chunked-dp-overlap-accum"],
)
def test_two_processes_match_one_process(common, reference, tmp_path, layout):
    run = tmp_path / "run"
    args = [*common, "--training.local_batch_size", "4", "--job.dump_folder", str(run), *layout]
    torchrun(*args)
    got = losses(run)
    assert got == pytest.approx(reference, abs=1e-5, rel=0)
    assert len({round(x, 6) for x in got}) > 5  # the losses actually move


def test_fsdp_collectives_do_not_grow_with_depth(common, tmp_path):
    out = torchrun(*common, "--training.local_batch_size", "4", "--job.dump_folder", str(tmp_path / "run"),
                   target=(str(REPO / "tests" / "dist_count_worker.py"),))  # fmt: skip
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["1+1"] == counts["12+4"] == counts["30+2"], counts
    gathers = counts["1+1"].get("all_gather_single", 0) + counts["1+1"].get("all_gather_into_tensor", 0)
    scatters = counts["1+1"].get("reduce_scatter_single", 0) + counts["1+1"].get("reduce_scatter_tensor", 0)
    assert gathers > 0 and scatters > 0, counts  # FSDP's own traffic is what is counted


def _stopped_early(run: Path) -> int:
    steps = sorted(
        int(p.name.split("-")[1]) for p in (run / "checkpoint").glob("step-*") if "." not in p.name
    )
    assert steps and steps[-1] < 10, steps  # the time limit stopped it before the end, with a checkpoint
    return steps[-1]


def _resume_1proc(run: Path, common: list[str], *extra: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "raven_titan.train", *common, "--job.dump_folder", str(run), *extra],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout


def all_losses(run: Path) -> list[float]:
    """Per-step losses, the last record of a step winning (a resumed run redoes steps after its checkpoint)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return list({r["step"]: r["loss"] for r in recs if r["kind"] == "train"}.values())


def test_resharding_two_processes_to_one_and_back(common, reference, tmp_path):
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "100"]
    # 2 FSDP ranks x 4 rows stop early (time limit) -> 1 process x 8 rows finishes the run
    a = tmp_path / "a"
    torchrun(*common, *ckpt, "--training.local_batch_size", "4", "--job.dump_folder", str(a),
             "--training.time_limit_minutes", "0.0001")  # fmt: skip
    _stopped_early(a)
    _resume_1proc(a, [*common, *ckpt, "--training.local_batch_size", "8"])
    assert all_losses(a) == pytest.approx(reference, abs=1e-5, rel=0)
    # 1 process stops early -> 2 ranks of chunked data parallel finish it
    b = tmp_path / "b"
    out = subprocess.run(
        [sys.executable, "-m", "raven_titan.train", *common, *ckpt, "--training.local_batch_size", "8",
         "--job.dump_folder", str(b), "--training.time_limit_minutes", "0.0001"],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    _stopped_early(b)
    torchrun(*common, *ckpt, "--training.local_batch_size", "4", "--job.dump_folder", str(b),
             "--parallelism.data_parallel_mode", "chunked")  # fmt: skip
    assert all_losses(b) == pytest.approx(reference, abs=1e-5, rel=0)


def test_layout_change_continues_the_global_data_position(common, tmp_path):
    # 2 ranks x 4 rows consume 16 rows in 2 steps; a 1-process run reading 3 rows per step continues at row 16
    # of the same order (the loader unit tests check the rows themselves), with the checkpoint's counters
    run = tmp_path / "run"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--lr_scheduler.decay_steps", "0"]
    torchrun(
        *common,
        *ckpt,
        "--training.steps",
        "2",
        "--training.local_batch_size",
        "4",
        "--job.dump_folder",
        str(run),
    )
    out = subprocess.run(
        [sys.executable, "-m", "raven_titan.train", *common, *ckpt, "--training.steps", "4",
         "--training.local_batch_size", "3", "--training.global_batch_size", "3", "--job.dump_folder", str(run)],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr + out.stdout
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    consumed = {r["step"]: r["tokens_per_source"]["shakespeare"] // 32 for r in recs if r["kind"] == "train"}
    assert consumed == {1: 8, 2: 16, 3: 19, 4: 22}


def test_two_process_run_killed_with_sigkill_resumes_bit_exactly(common, tmp_path):
    import signal
    import time

    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.local_batch_size", "4"]
    ref = tmp_path / "ref"
    torchrun(*common, *ckpt, "--job.dump_folder", str(ref))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "raven_titan.train", *common, *ckpt, "--job.dump_folder", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 200
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and len(all_losses(run)) >= 5
    ):  # fmt: skip
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-run
    proc.wait()
    assert len(all_losses(run)) < 10
    torchrun(*common, *ckpt, "--job.dump_folder", str(run))
    assert all_losses(run) == all_losses(ref)  # bit-identical


def test_fsdp_with_float8_all_gather_and_precomputed_scales(common, reference, tmp_path):
    run = tmp_path / "run"
    torchrun(*common, "--training.local_batch_size", "4", "--job.dump_folder", str(run), "--float8.enable",
             "--float8.enable_fsdp_float8_all_gather", "--float8.precompute_float8_dynamic_scale_for_fsdp")  # fmt: skip
    got = losses(run)
    assert got == pytest.approx(reference, rel=0.02) and got != reference  # float8 GEMMs, close to fp32


def test_a_corrupt_shard_found_by_one_rank_stops_every_rank(common, reference, tmp_path):
    # the ranks share the start-up read of the shards: file 1 of 4 is rank 1's, and rank 0 must stop too
    from raven_titan.data.shards import PackedRows, write_split

    cache = Path(common[common.index("--data.cache_dir") + 1])
    (prepared,) = cache.glob("shakespeare-*-L32-*")  # written by the reference run
    data = tmp_path / "data"
    for split in ("train", "val"):
        rows = PackedRows(prepared / split)
        write_split(
            data / split, np.concatenate(rows._open()), vocab_size=rows.vocab_size,
            tokenizer_fingerprint=rows.tokenizer_fingerprint, rows_per_file=len(rows) // 4 + 1,
        )  # fmt: skip
    victim = data / "train" / "00001.bin"
    raw = bytearray(victim.read_bytes())
    raw[10] ^= 1
    victim.write_bytes(bytes(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "raven_titan.train", *common, "--training.local_batch_size", "4", "--data.dataset", str(data),
           "--job.dump_folder", str(tmp_path / "r")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert out.returncode != 0
    assert (out.stdout + out.stderr).count("train/00001.bin: checksum mismatch") == 2, out.stderr[-3000:]
