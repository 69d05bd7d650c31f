"""Checkpoints: bit-exact resume (in process and after SIGKILL), atomic saves, SIGTERM, retention."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import raven_titan.checkpoint as ckpt_mod
from raven_titan.config.manager import parse_args
from raven_titan.train import Trainer

TINY = [
    "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
    "--training.seq_len", "32", "--training.local_batch_size", "4", "--lr_scheduler.warmup_steps", "2",
    "--lr_scheduler.decay_steps", "2", "--validation.no-enable", "--metrics.log_freq", "1",
    "--checkpoint.enable", "--checkpoint.interval", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def argv(run: Path, cache_dir: str, steps: int, *extra: str) -> list[str]:
    return [
        *TINY,
        "--job.dump_folder",
        str(run),
        "--data.cache_dir",
        cache_dir,
        "--training.steps",
        str(steps),
        *extra,
    ]


def losses(run: Path) -> dict[int, float]:
    """Per-step loss, the last record of a step winning (a resumed run redoes steps after its checkpoint)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def test_resume_in_process_is_bit_exact(tmp_path, cache_dir):
    Trainer(parse_args(argv(tmp_path / "ref", cache_dir, 6))).train()
    Trainer(parse_args(argv(tmp_path / "cut", cache_dir, 6, "--checkpoint.interval", "3"))).train()
    # a run interrupted after step 3 (its checkpoint saved), then started again on the same folder
    first = Trainer(parse_args(argv(tmp_path / "two", cache_dir, 6)))
    early = {}
    for step in (1, 2, 3):
        early[step] = first.train_step(first.next_micro_batches())["loss"]
    first.checkpointer.save(first.step)
    second = Trainer(parse_args(argv(tmp_path / "two", cache_dir, 6)))
    assert second.step == 3
    second.train()
    assert early | losses(tmp_path / "two") == losses(tmp_path / "ref")
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")
    assert len(losses(tmp_path / "ref")) == 6


def test_retention_keeps_the_latest_k(tmp_path, cache_dir):
    trainer = Trainer(parse_args(argv(tmp_path / "run", cache_dir, 8, "--checkpoint.interval", "1")))
    trainer.train()
    assert trainer.checkpointer.complete_steps() == [7, 8]


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(parse_args(argv(run, cache_dir, 4)))
    trainer.train()  # step-2 and step-4 saved
    real_save = ckpt_mod.dcp.save

    def dying_save(state, checkpoint_id):
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")  # some bytes hit the disk ...
        raise KeyboardInterrupt  # ... then the process is interrupted

    monkeypatch.setattr(ckpt_mod.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save(5)
    assert (run / "checkpoint" / "step-5.tmp").is_dir()
    assert trainer.checkpointer.latest_step() == 4
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    resumed = Trainer(parse_args(argv(run, cache_dir, 6)))
    assert resumed.step == 4  # the previous checkpoint loads
    resumed.train()
    assert not (run / "checkpoint" / "step-5.tmp").exists()  # cleaned up by the next save


def _launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "raven_titan.train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def test_sigkill_at_random_steps_then_rerun_is_bit_exact(tmp_path, cache_dir):
    steps = 12
    ref = tmp_path / "ref"
    assert _launch(argv(ref, cache_dir, steps)).wait(timeout=180) == 0
    run = tmp_path / "run"
    rng = random.Random(1234)
    for kill_at in sorted(rng.sample(range(2, steps - 1), 2)):
        proc = _launch(argv(run, cache_dir, steps))
        _wait_for_step(proc, run, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = _launch(argv(run, cache_dir, steps))
    out, err = final.communicate(timeout=180)
    assert final.returncode == 0, err[-2000:]
    assert "resuming from" in out
    assert losses(run) == losses(ref)  # bit-identical per-step losses
    assert len(losses(ref)) == steps


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = _launch(argv(run, cache_dir, 500, "--checkpoint.interval", "1000"))
    _wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    last = max(losses(run))
    assert (run / "checkpoint" / f"step-{last}" / ".metadata").is_file()


def test_async_save_is_bit_exact_and_appears_only_when_complete(tmp_path, cache_dir):
    ref = tmp_path / "ref"
    Trainer(parse_args(argv(ref, cache_dir, 6))).train()
    run = tmp_path / "run"
    first = Trainer(parse_args(argv(run, cache_dir, 6, "--checkpoint.async_mode", "async")))
    for _ in range(2):
        first.train_step(first.next_micro_batches())
    first.checkpointer.save(2)  # staged; written in the background
    assert first.checkpointer.latest_step() is None or first.checkpointer.latest_step() == 2
    first.checkpointer.wait()
    assert first.checkpointer.latest_step() == 2
    resumed = Trainer(parse_args(argv(run, cache_dir, 6, "--checkpoint.async_mode", "async")))
    assert resumed.step == 2
    resumed.train()
    assert resumed.checkpointer.complete_steps() == [4, 6]
    assert losses(run) == {s: v for s, v in losses(ref).items() if s > 2}


def test_initial_weights_from_another_runs_checkpoint(tmp_path, cache_dir):
    import torch

    source = Trainer(parse_args(argv(tmp_path / "a", cache_dir, 4, "--checkpoint.interval", "4")))
    source.train()
    step = tmp_path / "a" / "checkpoint" / "step-4"
    fresh = Trainer(parse_args(argv(tmp_path / "b", cache_dir, 4, "--training.seed", "5",
                                    "--checkpoint.initial_load_path", str(step))))  # fmt: skip
    assert fresh.step == 0  # weights only: a new run
    for (name, a), (_, b) in zip(source.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(a, b), name
