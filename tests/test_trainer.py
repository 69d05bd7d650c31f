"""Trainer behaviour: gradient accumulation equivalence, determinism, non-finite handling, falling loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raven_titan.config.manager import parse_args
from raven_titan.errors import RavenError
from raven_titan.train import Trainer

TINY = [
    "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
    "--training.seq_len", "32", "--lr_scheduler.warmup_steps", "1", "--lr_scheduler.decay_steps", "0",
    "--validation.no-enable", "--metrics.log_freq", "100",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def make_trainer(tmp_path, cache_dir, *extra: str) -> Trainer:
    argv = [*TINY, "--job.dump_folder", str(tmp_path / "run"), "--data.cache_dir", cache_dir, *extra]
    return Trainer(parse_args(argv))


def run_steps(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step(trainer.next_micro_batches())["loss"] for _ in range(steps)]


def test_gradient_accumulation_4x1_equals_1x4(tmp_path, cache_dir):
    common = ["--training.mixed_precision_param", "float32", "--training.global_batch_size", "4"]
    one = make_trainer(tmp_path / "a", cache_dir, *common, "--training.local_batch_size", "4")
    four = make_trainer(tmp_path / "b", cache_dir, *common, "--training.local_batch_size", "1")
    assert (one.accum, four.accum) == (1, 4)
    # gradients of one step (before the optimizer, whose first Adam step amplifies rounding in tiny grads)
    loss_one, _ = one.forward_backward(one.next_micro_batches(), 2, 2)
    loss_four, _ = four.forward_backward(four.next_micro_batches(), 2, 2)
    assert float(loss_one) == pytest.approx(float(loss_four), abs=1e-6)
    for (name, p1), (_, p4) in zip(one.model.named_parameters(), four.model.named_parameters()):
        torch.testing.assert_close(p1.grad, p4.grad, atol=1e-6, rtol=1e-4, msg=name)
    # and losses over whole training steps with random depths
    one.optimizer.zero_grad(set_to_none=True)
    four.optimizer.zero_grad(set_to_none=True)
    losses_one, losses_four = run_steps(one, 4), run_steps(four, 4)
    assert losses_one == pytest.approx(losses_four, abs=1e-5, rel=0)
    # the comparison is not vacuous: another seed gives other losses
    other = make_trainer(
        tmp_path / "c", cache_dir, *common, "--training.local_batch_size", "4", "--training.seed", "1"
    )
    assert run_steps(other, 1)[0] != pytest.approx(losses_one[0], abs=1e-5)


def test_same_config_gives_bit_identical_losses(tmp_path, cache_dir):
    a = run_steps(make_trainer(tmp_path / "a", cache_dir), 3)
    b = run_steps(make_trainer(tmp_path / "b", cache_dir), 3)
    assert a == b


def _poison(trainer: Trainer) -> None:
    trainer.model.transformer.ln_f.register_forward_hook(lambda mod, inp, out: out * float("nan"))


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir)
    _poison(trainer)
    with pytest.raises(RavenError, match=r"non-finite loss .* at step 1; lower optimizer.lr"):
        trainer.train_step(trainer.next_micro_batches())


def test_nonfinite_step_is_skipped_without_touching_weights(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir, "--training.on_nonfinite", "skip")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _poison(trainer)
    out = trainer.train_step(trainer.next_micro_batches())
    assert out["skipped"] and math.isnan(out["loss"])
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None


def test_loss_falls_on_the_builtin_corpus(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir, "--training.steps", "40", "--optimizer.lr", "0.01")
    result = trainer.train()
    assert result["last_loss"] < result["first_loss"] * 0.8, result


def test_telemetry_records_are_written_when_enabled(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir, "--training.steps", "4", "--metrics.telemetry_freq", "2")
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tele = [r for r in records if r["kind"] == "telemetry"]
    assert [r["step"] for r in tele] == [2, 4]
    for key in ("state_norm", "rel_residual", "latent_token_corr", "hidden_token_corr", "weights/grad_norm"):
        assert math.isfinite(tele[-1][key]), key
    off = make_trainer(tmp_path / "off", cache_dir, "--training.steps", "2")
    off.train()
    assert "telemetry" not in (tmp_path / "off" / "run" / "metrics.jsonl").read_text()


def test_export_at_end_then_initial_load_and_a_failing_push_does_not_stop_training(
    tmp_path, cache_dir, monkeypatch
):
    import raven_titan.hf.hub as hub

    def failing_push(*args, **kwargs):
        raise RavenError("push failed: HTTP 500 from the Hub")

    monkeypatch.setattr(hub, "push_folder", failing_push)
    trainer = make_trainer(
        tmp_path, cache_dir, "--training.steps", "3", "--checkpoint.export_hf_at_end",
        "--checkpoint.export_dtype", "float32", "--hub.repo_id", "org/raven-test",
    )  # fmt: skip
    result = trainer.train()
    assert result["steps"] == 3  # training finished although the push failed
    assert trainer.hub.results and not trainer.hub.results[-1].ok
    export = tmp_path / "run" / "hf" / "step-3"
    assert (export / "config.json").is_file()
    # a new run starts from the exported weights
    fresh = make_trainer(
        tmp_path / "b", cache_dir, "--checkpoint.initial_load_path", str(export), "--training.seed", "7"
    )
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(a, b), name


def test_tensorboard_and_wandb_offline_sinks_get_the_same_records(tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = make_trainer(
        tmp_path, cache_dir, "--training.steps", "4", "--metrics.log_freq", "2", "--validation.enable",
        "--validation.freq", "4", "--validation.depths", "1", "2", "--validation.steps", "1",
        "--metrics.enable_tensorboard", "--metrics.enable_wandb", "--metrics.wandb_mode", "offline",
    )  # fmt: skip
    trainer.train()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    val = next(r for r in records if r["kind"] == "validation")
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb_loss == pytest.approx(train, rel=1e-6)
    assert events.Scalars("validation/val_loss_d2")[0].value == pytest.approx(val["val_loss"]["2"], rel=1e-6)
    # the offline run file stores each history item as key + JSON value text (protobuf strings)
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = wandb_file.read_bytes()
    for key, value in [("train/loss", train[4]), ("validation/val_loss_d1", val["val_loss"]["1"])]:
        assert key.encode() in data and json.dumps(value).encode() in data, key
