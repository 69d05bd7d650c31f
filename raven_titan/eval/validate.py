"""Per-depth validation of a checkpoint of a training run, outside training.

    python -m raven_titan.eval.validate --run RUN_FOLDER [--step N] [--depths 1 4 8 32] [--steps K]

The Trainer is rebuilt from `<run>/config.json` (the resolved config the run wrote), the weights of
`<run>/<checkpoint.folder>/step-N` (default: the latest complete one) are restored, and `Trainer.validate` runs
on the first K batches of the held-out split at each requested test-time depth — the same batches, latent-state
seeds and autocast as validation during training, so a standalone result at a step equals the in-training one.
A loss/perplexity table is printed and a `"validation"` record with `"source": "standalone"` is appended to
`<run>/metrics.jsonl`. Only the model is loaded (not the optimizer, data-loader or RNG states), and nothing
else in the run folder is touched (the rebuilt Trainer writes its config into a temporary folder).

Under torchrun the held-out batches are split over the ranks as in training; rank 0 prints and records.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raven_titan.errors import RavenError, run_command

logger = logging.getLogger("raven_titan")

# every checkpointed state except the weights: validation needs the model only
_SKIP_STATES = ["optimizer", "lr_scheduler", "dataloader", "train_state", "rng"]


@dataclass
class ValidationResult:
    step: int
    """The checkpoint step that was evaluated."""
    losses: dict[int, float]
    """Mean per-token cross-entropy on the held-out batches, by test-time depth."""
    checkpoint: Path
    val_steps: int
    """Held-out batches (per rank) that were evaluated."""

    @property
    def perplexities(self) -> dict[int, float]:
        return {d: math.exp(min(v, 50)) for d, v in self.losses.items()}


def read_run_config(run: Path) -> dict[str, Any]:
    """The resolved config dict (sections -> fields) that a training run wrote to `<run>/config.json`."""
    path = run / "config.json"
    if not run.is_dir():
        raise RavenError(f"run folder not found: {run}; pass the job.dump_folder of a training run to --run")
    if not path.is_file():
        raise RavenError(
            f"{run} has no config.json; pass the job.dump_folder of a training run (it writes config.json)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RavenError(f"{path}: not valid JSON ({e}); was the run interrupted while writing it?") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "training" not in data:
        hint = " (it looks like a Hugging Face export, which this command does not load yet)" if data else ""
        raise RavenError(f"{path} is not a raven_titan run config{hint}; pass a training run folder to --run")
    return data


def checkpoint_steps(run: Path, data: dict[str, Any]) -> tuple[Path, list[int]]:
    """The run's checkpoint folder and its complete steps (ascending)."""
    from raven_titan.checkpoint import CheckpointManager
    from raven_titan.config.job_config import Checkpoint

    cfg = Checkpoint(folder=str(data.get("checkpoint", {}).get("folder", "checkpoint")))
    manager = CheckpointManager(cfg, run, {})
    return manager.folder, manager.complete_steps()


def build_job(
    data: dict[str, Any],
    run: Path,
    work_folder: Path,
    step: int,
    depths: list[int] | None = None,
    steps: int | None = None,
    device: str | None = None,
):
    """A JobConfig equivalent to the run's, set up to restore only the weights of `step` and to validate at
    `depths` (default: the run's validation.depths up to its max_depth) on `steps` batches (default: the run's
    validation.steps). The Trainer's own outputs go to `work_folder`, never into the run folder."""
    from raven_titan.config.manager import config_from_dict, validate

    data = copy.deepcopy(data)
    data.setdefault("job", {}).pop("config_file", None)
    job = config_from_dict(data, str(run / "config.json"))
    ckpt_folder = Path(job.checkpoint.folder)
    job.job.dump_folder = str(work_folder)
    job.job.dry_run = False
    job.job.print_config = False
    job.checkpoint.enable = True
    job.checkpoint.folder = str(ckpt_folder if ckpt_folder.is_absolute() else (run / ckpt_folder).resolve())
    job.checkpoint.load_step = step
    job.checkpoint.exclude_from_loading = list(_SKIP_STATES)
    job.metrics.enable_jsonl = False  # the standalone record is written to the run's metrics.jsonl below
    job.metrics.telemetry_freq = 0
    # validation needs no particular layout or gradient accumulation: any number of processes will do
    job.parallelism.data_parallel_shard_degree = job.parallelism.data_parallel_replicate_degree = -1
    job.training.global_batch_size = -1
    v = job.validation
    if depths is not None:
        v.depths = list(depths)
        v.max_depth = max(depths)
    if steps is not None:
        v.steps = steps
    if device is not None:
        job.training.device = device
    v.enable = True
    validate(job)
    return job


def validate_run(
    run: str | Path,
    step: int | None = None,
    depths: list[int] | None = None,
    steps: int | None = None,
    device: str | None = None,
    record: bool = True,
) -> ValidationResult:
    """Validate checkpoint `step` (default: the latest) of the training run in `run` at each depth; print the
    table and (with `record`) append a standalone "validation" record to `<run>/metrics.jsonl` (rank 0)."""
    from raven_titan.metrics.logger import format_val_table
    from raven_titan.parallel.distributed import teardown
    from raven_titan.train import Trainer

    run = Path(run).expanduser()
    if depths is not None and (not depths or min(depths) < 1):
        raise RavenError(f"--depths {depths}: every depth must be >= 1, e.g. --depths 1 4 8 32")
    if steps is not None and steps < 1:
        raise RavenError(f"--steps {steps}: the number of held-out batches must be >= 1")
    data = read_run_config(run)
    folder, available = checkpoint_steps(run, data)
    if not available:
        raise RavenError(
            f"{run} has no complete checkpoint in {folder}; validate a run trained with "
            "--checkpoint.enable (Hugging Face export folders are not supported by this command yet)"
        )
    if step is None:
        step = available[-1]
    elif step not in available:
        raise RavenError(f"no complete checkpoint for step {step} in {folder}; available steps: {available}")

    with tempfile.TemporaryDirectory(prefix="raven_validate_") as work:
        job = build_job(data, run, Path(work), step, depths, steps, device)
        state = {"trainer": Trainer(job)}
        trainer = state["trainer"]
        v = job.validation
        logger.info(
            "validating %s at depths %s on %d held-out batch(es) of %d rows per rank",
            folder / f"step-{step}", [d for d in v.depths if d <= v.max_depth], v.steps,
            job.training.local_batch_size,
        )  # fmt: skip
        losses = trainer.validate()
        rank = trainer.rank
        del trainer
        teardown(state)

    result = ValidationResult(step, losses, folder / f"step-{step}", job.validation.steps)
    if rank == 0:
        print(format_val_table(step, losses), flush=True)
        if record:
            append_record(run, result)
    return result


def append_record(run: Path, result: ValidationResult) -> Path:
    """Append the result to `<run>/metrics.jsonl` in the shape of the trainer's validation records."""
    path = run / "metrics.jsonl"
    record = {
        "kind": "validation",
        "step": result.step,
        "val_loss": {str(d): v for d, v in result.losses.items()},
        "val_ppl": {str(d): p for d, p in result.perplexities.items()},
        "source": "standalone",
        "checkpoint": str(result.checkpoint),
        "val_steps": result.val_steps,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raven_titan.eval.validate",
        description=(
            "Held-out loss and perplexity at several test-time recurrence depths for a checkpoint of a training "
            "run: rebuilds the model from RUN/config.json, loads RUN/checkpoint/step-N, prints a table and "
            'appends a "validation" record with "source": "standalone" to RUN/metrics.jsonl. Only training run '
            "folders are accepted for now (not Hugging Face export folders)."
        ),
    )
    p.add_argument(
        "--run", "--run-folder", dest="run", required=True, metavar="RUN_FOLDER",
        help="training run folder (its job.dump_folder); under torchrun spell it --run-folder (torchrun "
        "takes --run as an abbreviation of its own --run-path)",
    )  # fmt: skip
    p.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the latest)")
    p.add_argument(
        "--depths", type=int, nargs="+", default=None, metavar="D",
        help="test-time depths (default: the run's validation.depths up to validation.max_depth)",
    )  # fmt: skip
    p.add_argument(
        "--steps", type=int, default=None, metavar="K",
        help="held-out batches of training.local_batch_size rows (default: the run's validation.steps)",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None,
        help="device (default: the run's training.device)",
    )  # fmt: skip
    p.add_argument(
        "--no-record", dest="record", action="store_false", help="print only; do not append to metrics.jsonl"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from raven_titan.train import setup_logging

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def body() -> None:
        validate_run(args.run, args.step, args.depths, args.steps, args.device, args.record)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
