"""The user-facing commands: run_train.sh honours --job.config_file, dry run on the Huginn shape, bad input
gives one-line errors without tracebacks, and a short end-to-end run writes config.json and metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_train(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAVEN_TITAN_PYTHON": sys.executable}
    return subprocess.run(
        [str(REPO / "run_train.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_config_file_flag_is_honoured_by_run_train_sh(tmp_path):
    cfg = tmp_path / "mine.toml"
    cfg.write_text('[model]\nflavor = "raven-150m"\n[training]\nseq_len = 64\n')
    out = run_train("--job.config_file", str(cfg), "--job.dry_run")
    assert out.returncode == 0, out.stderr
    assert "raven/raven-150m" in out.stdout  # the file's flavor, not the default debug one
    default = run_train("--job.dry_run")
    assert default.returncode == 0, default.stderr
    assert "raven/debug" in default.stdout


def test_dry_run_reports_the_exact_huginn_parameter_count():
    out = run_train("--job.config_file", "train_configs/nebel_raven_3.5b.toml", "--job.dry_run")
    assert out.returncode == 0, out.stderr
    assert "3,564,976,800 total" in out.stdout
    assert "global 4096 = local 1 x accumulation 4096 x data-parallel 1" in out.stdout


@pytest.mark.parametrize(
    "toml, extra, needle",
    [
        ("[training\nsteps = 3\n", [], "malformed TOML"),
        ("[training]\nstpes = 3\n", [], "did you mean 'steps'"),
        ('[training]\nsteps = "3"\n', [], "has the wrong type"),
        ("[model]\nn_heads = 5\n", [], "does not divide"),
        ("", ["--data.dataset", "/nonexistent/prepared"], "/nonexistent/prepared"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, toml, extra, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    out = run_train("--job.config_file", str(cfg), *extra)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr


def test_missing_config_file_is_reported():
    out = run_train("--job.config_file", "train_configs/nope.toml")
    assert out.returncode != 0 and "config file not found: train_configs/nope.toml" in out.stderr


def test_help_is_generated_from_the_docstrings():
    out = run_train("--help")
    assert out.returncode == 0
    assert "Optimizer steps to train." in out.stdout
    assert "Blocks in the recurrent core" in out.stdout


def test_short_run_writes_config_and_metrics(tmp_path):
    run = tmp_path / "run"
    out = run_train(
        "--job.dump_folder", str(run), "--training.steps", "4", "--training.seq_len", "32",
        "--training.local_batch_size", "4", "--training.global_batch_size", "8",
        "--lr_scheduler.warmup_steps", "1", "--lr_scheduler.decay_steps", "1", "--metrics.log_freq", "2",
        "--validation.freq", "4", "--validation.steps", "1", "--validation.depths", "1", "2",
        "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
        "--data.cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["n_embd"] == 64 and config["training"]["global_batch_size"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "mfu",
        "num_steps_no_grad",
        "num_steps_with_grad",
    ):
        assert key in train[-1]
    assert train[-1]["mfu"] is None  # CPU: no invented peak
    val = [r for r in records if r["kind"] == "validation"]
    assert len(val) == 1 and set(val[0]["val_loss"]) == {"1", "2"}
