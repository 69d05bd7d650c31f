"""Config system: TOML inheritance, unknown keys, types, ranges, cross-field checks, CLI precedence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raven_titan.config.job_config import JobConfig
from raven_titan.config.manager import dump_config, find_config_file, load_toml, parse_args
from raven_titan.errors import RavenError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_inheritance_merges_sections_and_child_wins(tmp_path):
    write(tmp_path, "base.toml", "[training]\nsteps = 27\nseq_len = 64\n[optimizer]\nlr = 0.5\n")
    child = write(tmp_path, "child.toml", 'base = "base.toml"\n[training]\nsteps = 29\n')
    job = parse_args(["--job.config_file", str(child)])
    assert job.training.steps == 29  # child overrides
    assert job.training.seq_len == 64  # inherited key in the same section
    assert job.optimizer.lr == 0.5  # inherited section


def test_inheritance_cycle_is_reported(tmp_path):
    write(tmp_path, "a.toml", 'base = "b.toml"\n')
    write(tmp_path, "b.toml", 'base = "a.toml"\n')
    with pytest.raises(RavenError, match="cycle"):
        load_toml(tmp_path / "a.toml")


def test_unknown_key_suggests_the_close_name(tmp_path):
    cfg = write(tmp_path, "x.toml", "[training]\nstpes = 3\n")
    with pytest.raises(RavenError, match=r"unknown key 'stpes' in \[training\] \(did you mean 'steps'\?\)"):
        parse_args(["--job.config_file", str(cfg)])


def test_unknown_key_in_wrong_section_names_the_right_one(tmp_path):
    cfg = write(tmp_path, "x.toml", "[training]\nlog_freq = 3\n")
    with pytest.raises(RavenError, match=r"belongs in \[metrics\]"):
        parse_args(["--job.config_file", str(cfg)])


def test_unknown_section(tmp_path):
    cfg = write(tmp_path, "x.toml", "[trainig]\nsteps = 3\n")
    with pytest.raises(RavenError, match=r"unknown section \[trainig\] \(did you mean 'training'\?\)"):
        parse_args(["--job.config_file", str(cfg)])


@pytest.mark.parametrize(
    "body, message",
    [
        ('[training]\nsteps = "ten"\n', r"training.steps = 'ten' has the wrong type: expected int"),
        ("[training]\nsteps = 1.5\n", "training.steps = 1.5 has the wrong type"),
        ("[training]\nsteps = true\n", "has the wrong type"),
        ("[training]\nsteps = 0\n", r"training.steps = 0 is out of range: it must be >= 1"),
        ('[optimizer]\nname = "adamw"\n', r"not a valid choice: use one of \['AdamW', 'ELLISAdam'\]"),
        ("[validation]\ndepths = [1, 'x']\n", r"validation.depths\[1\]"),
        ('[model]\nn_embd = "big"\n', "model.n_embd = 'big' has the wrong type"),
        ("[optimizer]\nbeta2 = 1.5\n", "must be <= 1"),
    ],
)
def test_values_are_type_and_range_checked(tmp_path, body, message):
    cfg = write(tmp_path, "x.toml", body)
    with pytest.raises(RavenError, match=message):
        parse_args(["--job.config_file", str(cfg)])


def test_int_is_accepted_for_float_fields(tmp_path):
    cfg = write(tmp_path, "x.toml", "[optimizer]\nlr = 1\n")
    job = parse_args(["--job.config_file", str(cfg)])
    assert job.optimizer.lr == 1.0 and isinstance(job.optimizer.lr, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.n_heads", "3"], "does not divide model.n_embd"),
        (["--model.mean_backprop_depth", "9"], "exceeds model.mean_recurrence"),
        (
            ["--training.global_batch_size", "20", "--training.local_batch_size", "8"],
            "not a positive multiple",
        ),
        (["--training.seq_len", "2048"], "exceeds the RoPE table"),
        (["--training.steps", "5"], "warmup_steps"),  # default warmup 10 > 5 steps
        (["--model.flavor", "debg"], "did you mean 'debug'"),
        (["--validation.depths", "128", "--validation.max_depth", "64"], "no entry <= validation.max_depth"),
    ],
)
def test_cross_field_checks_run_before_allocation(overrides, message):
    with pytest.raises(RavenError, match=message):
        parse_args(overrides)


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    cfg = write(tmp_path, "x.toml", "[training]\nsteps = 40\nseq_len = 64\n")
    job = parse_args(["--job.config_file", str(cfg), "--training.steps", "30"])
    assert job.training.steps == 30  # CLI beats TOML
    assert job.training.seq_len == 64  # TOML beats the default
    assert job.training.max_norm == JobConfig().training.max_norm  # default where neither sets it
    # both spellings of a flag and the = form work
    job = parse_args([f"--job.config-file={cfg}", "--training.seq-len=32"])
    assert job.training.seq_len == 32


def test_cli_values_are_range_checked_too():
    with pytest.raises(RavenError, match="training.max_norm = -1.0 is out of range"):
        parse_args(["--training.max_norm", "-1"])


def test_model_section_overrides_the_flavor():
    job = parse_args(["--model.n_embd", "128", "--model.n_heads", "2"])
    from raven_titan.models import get_model_spec

    args = get_model_spec("raven").resolve_args(job.model)
    assert (args.n_embd, args.n_heads) == (128, 2)
    assert args.intermediate_size == 704  # untouched fields keep the flavor's value


def test_last_config_file_flag_wins():
    assert find_config_file(["--job.config_file", "a.toml", "--job.config-file=b.toml"]) == "b.toml"
    assert find_config_file(["--training.steps", "3"]) is None


def test_default_config_is_used_only_when_the_flag_is_absent(tmp_path):
    other = write(tmp_path, "x.toml", "[training]\nsteps = 33\n")
    default = REPO / "train_configs" / "debug_model.toml"
    assert parse_args([], default_config=str(default)).training.steps == 150
    assert parse_args(["--job.config_file", str(other)], default_config=str(default)).training.steps == 33


def test_shipped_configs_validate():
    for path in sorted((REPO / "train_configs").glob("*.toml")):
        job = parse_args(["--job.config_file", str(path)])
        assert job.job.config_file == str(path)
    base = parse_args(["--job.config_file", str(REPO / "train_configs" / "nebel_raven_3.5b_baseline.toml")])
    assert base.model.sampling_scheme == "non-recurrent" and base.optimizer.name == "ELLISAdam"


def test_resolved_config_is_dumped_with_model_fields_filled(tmp_path):
    job = parse_args(["--model.n_embd", "128", "--model.n_heads", "2"])
    path = dump_config(job, tmp_path / "run")
    data = json.loads(path.read_text())
    assert data["model"]["n_embd"] == 128
    assert data["model"]["intermediate_size"] == 704  # resolved from the flavor, not null
    assert data["training"]["steps"] == job.training.steps
