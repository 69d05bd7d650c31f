"""`python -m raven_titan.eval.validate`: per-depth validation of a run's checkpoint equals a direct
computation with the trained model, is recorded in metrics.jsonl, and bad input gives one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raven_titan.config.manager import parse_args
from raven_titan.data.loader import val_batches
from raven_titan.data.shards import PackedRows
from raven_titan.eval import validate as validate_cmd
from raven_titan.train import Trainer, state_seed

DEPTHS = [1, 2, 4]
VAL_STEPS = 2

TINY = [
    "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
    "--training.seq_len", "32", "--training.local_batch_size", "4", "--training.mixed_precision_param",
    "float32", "--lr_scheduler.warmup_steps", "1", "--lr_scheduler.decay_steps", "1",
    "--metrics.log_freq", "1", "--training.steps", "4", "--checkpoint.enable", "--checkpoint.interval", "2",
    "--validation.freq", "2", "--validation.steps", str(VAL_STEPS), "--validation.depths", "1", "2", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and in-training validation at both; the trainer (its
    model holds the step-4 weights) and the run folder."""
    root = tmp_path_factory.mktemp("validate")
    run = root / "run"
    trainer = Trainer(parse_args([*TINY, "--job.dump_folder", str(run), "--data.cache_dir", str(root / "c")]))
    trainer.train()
    return trainer, run


def records(run: Path, kind: str = "validation") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@torch.no_grad()
def direct_losses(trainer: Trainer, depths: list[int], steps: int) -> dict[int, float]:
    """Mean token cross-entropy of the first `steps` held-out batches at each depth, computed here."""
    t = trainer.job.training
    ((_, folder),) = trainer.sources
    batches = list(val_batches(PackedRows(folder / "val"), t.local_batch_size, 0, 1, steps))
    assert len(batches) == steps
    model = trainer.model.eval()
    out = {}
    for depth in depths:
        total, count = 0.0, 0
        for b, (inputs, labels) in enumerate(batches):
            seeds = [state_seed(t.seed, -1, b * len(inputs) + i) for i in range(len(inputs))]
            logits = model(inputs, num_steps=(depth, 0), state_seeds=seeds).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
            count += labels.numel()
        out[depth] = total / count
    model.train()
    return out


def test_command_equals_a_direct_computation(trained, capsys):
    trainer, run = trained
    config_before = (run / "config.json").read_text()
    n_before = len(records(run))
    argv = ["--run", str(run), "--depths", *map(str, DEPTHS), "--steps", str(VAL_STEPS)]
    assert validate_cmd.main(argv) == 0

    out = capsys.readouterr().out
    assert "validation @ step 4\n  depth       1        2        4\n  loss" in out
    new = records(run)[n_before:]
    assert len(new) == 1 and new[0]["source"] == "standalone" and new[0]["step"] == 4
    losses = {int(d): v for d, v in new[0]["val_loss"].items()}
    # same batches, seeds and weights; Trainer.validate rounds its loss sum to float32 (torch.tensor(total)),
    # the direct sum here is float64: equal to ~1e-7 relative. Depths differ by far more (checked below).
    direct = direct_losses(trainer, DEPTHS, VAL_STEPS)
    assert list(losses) == DEPTHS
    assert [losses[d] for d in DEPTHS] == pytest.approx([direct[d] for d in DEPTHS], rel=1e-6, abs=0)
    assert min(abs(a - b) for a in losses.values() for b in losses.values() if a != b) > 1e-3
    assert len(set(losses.values())) == len(DEPTHS)  # the depth changes the result
    in_training = [r for r in records(run) if r["step"] == 4 and "source" not in r]
    assert in_training[0]["val_loss"] == new[0]["val_loss"]
    assert (run / "config.json").read_text() == config_before  # the run's config is left alone
    assert set(new[0]["val_ppl"]) == {"1", "2", "4"}


def test_an_earlier_step_and_other_depths(trained):
    trainer, run = trained
    n_before = len(records(run))
    early = validate_cmd.validate_run(run, step=2, depths=[1, 2, 8], steps=VAL_STEPS, record=False)
    assert early.step == 2 and list(early.losses) == [1, 2, 8]
    assert len(records(run)) == n_before  # record=False writes nothing
    # the step-2 weights: equal to the in-training validation at step 2, not to the final weights' losses
    in_training = [r for r in records(run) if r["step"] == 2 and "source" not in r][0]["val_loss"]
    assert [early.losses[1], early.losses[2]] == [in_training["1"], in_training["2"]]
    assert early.losses[1] != direct_losses(trainer, [1], VAL_STEPS)[1]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--step", "3"], "no complete checkpoint for step 3"),
        (["--depths", "0"], "every depth must be >= 1"),
        (["--steps", "0"], "must be >= 1"),
    ],
)
def test_bad_input_is_a_one_line_error(trained, capsys, args, needle):
    _, run = trained
    assert validate_cmd.main(["--run", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_folders_that_are_not_checkpointed_runs(tmp_path, capsys):
    assert validate_cmd.main(["--run", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "huginn_raven", "hidden_size": 64}))
    assert validate_cmd.main(["--run", str(tmp_path)]) == 2
    assert "Hugging Face export" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model": {}, "training": {}, "checkpoint": {}}))
    assert validate_cmd.main(["--run", str(plain)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
