"""The trainer: config -> model (meta build, AC, compile, init) -> data -> optimizer -> loop -> metrics.

One process on CPU or one GPU in this version; the places where data parallelism plugs in are the loader's
(dp_rank, dp_size), the state-noise seeds and the valid-token count (both global), and `parallelize`.
Run as `python -m raven_titan.train [--job.config_file FILE] [--section.key value ...]` or `./run_train.sh`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from raven_titan.checkpoint import CheckpointManager, ModelState, OptimizerState, RNGState, TrainState
from raven_titan.config.job_config import Hub, JobConfig
from raven_titan.config.manager import REPO_ROOT, dump_config, parse_args, repo_path, resolved_dict
from raven_titan.data.default_corpus import resolve_sources, verify_dataset
from raven_titan.data.loader import build_train_loader, val_batches
from raven_titan.data.mixture import Mixture, Source
from raven_titan.data.shards import PackedRows
from raven_titan.data.tokenizer import load_tokenizer
from raven_titan.errors import RavenError, run_command
from raven_titan.hf.export import export_from_checkpoint, export_hf
from raven_titan.hf.hub import HubPusher
from raven_titan.metrics import peak_flops, peak_memory_gib, reset_peak_memory
from raven_titan.metrics.logger import MetricsLogger
from raven_titan.metrics.telemetry import collapse_warning, recurrence_stats, snapshot_params, update_stats
from raven_titan.models import get_model_spec
from raven_titan.optim import build_lr_scheduler, build_optimizer
from raven_titan.parallel.distributed import init_distributed, teardown
from raven_titan.parallel.float8 import precompute_scales
from raven_titan.parallel.parallelize import build_mesh, build_model

logger = logging.getLogger("raven_titan")

DEFAULT_CONFIG = REPO_ROOT / "train_configs" / "debug_model.toml"


def state_seed(seed: int, step: int, sample: int) -> int:
    """Seed of one sample's initial latent noise: a function of the global sample position in the step, so
    the noise is the same however the global batch is split into micro-batches or ranks."""
    return ((seed * 6364136223846793005 + step) * 1442695040888963407 + sample) % (2**63 - 1)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RavenError("training.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


class Trainer:
    def __init__(self, job: JobConfig) -> None:
        self.job = job
        t = job.training
        layout = init_distributed(timeout_s=job.parallelism.timeout_seconds)
        self.rank = layout.rank
        self.device = pick_device(t.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", layout.local_rank)
        self.dtype = torch.bfloat16 if t.mixed_precision_param == "bfloat16" else torch.float32
        self.spec = get_model_spec(job.model.name)
        self.args = self.spec.resolve_args(job.model)
        self.dp_rank, self.dp_size = layout.rank, layout.world_size  # every dimension is data-parallel
        self.global_batch = (
            t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.dp_size
        )
        self.accum = self.global_batch // (t.local_batch_size * self.dp_size)
        self.folder = Path(job.job.dump_folder)
        if self.rank == 0:
            path = dump_config(job, self.folder)
            if job.job.print_config:
                logger.info("config: %s", path.read_text())

        tok = load_tokenizer(repo_path(job.data.tokenizer))
        if tok.vocab_size > self.args.vocab_size:
            raise RavenError(
                f"tokenizer {tok.path} has {tok.vocab_size} tokens but model.vocab_size = {self.args.vocab_size}; "
                "set model.vocab_size to at least the tokenizer's size"
            )
        self.sources = self._on_rank0_first(lambda: resolve_sources(job.data, t.seq_len, tok, verify=False))
        for folder in dict.fromkeys(folder for _, folder in self.sources):  # every rank reads its share
            self._on_every_rank(
                lambda f=folder: verify_dataset(f, job.data, tok, part=(self.rank, self.dp_size))
            )
        self.train_splits = [PackedRows(folder / "train") for _, folder in self.sources]
        self.mixture = Mixture(
            [
                Source(s.name, len(rows), s.weight, s.epochs)
                for (s, _), rows in zip(self.sources, self.train_splits)
            ],
            t.seed,
        )
        self.val_by_source: dict[str, dict[int, float]] = {}
        self.train_iter = None  # created on first use, after a checkpoint may have restored the position

        torch.manual_seed(t.seed)
        self.mesh = build_mesh(job.parallelism, self.device)
        self.model, self.reducer = build_model(self.spec, self.args, job, self.device, self.mesh)
        self.optimizer = build_optimizer(self.model, job.optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, job.lr_scheduler, t.steps)
        self.metrics = MetricsLogger(
            self.folder,
            job.metrics.enable_jsonl and self.rank == 0,
            job.metrics if self.rank == 0 else None,
            resolved_dict(job),
        )
        self.state = TrainState()
        self.checkpointer = CheckpointManager(
            job.checkpoint, self.folder,
            {
                "model": ModelState(self.model), "optimizer": OptimizerState(self.model, self.optimizer),
                "lr_scheduler": self.scheduler, "train_state": self.state, "rng": RNGState(),
            },
        )  # fmt: skip
        if job.checkpoint.enable:
            load_step = None if job.checkpoint.load_step < 0 else job.checkpoint.load_step
            exclude = tuple(job.checkpoint.exclude_from_loading)
            loaded = self.checkpointer.load(load_step, exclude)
            if loaded is not None:
                ignored = (
                    " (checkpoint.initial_load_path ignored)" if job.checkpoint.initial_load_path else ""
                )
                logger.info(
                    "resuming from %s (step %d)%s",
                    self.checkpointer.folder / f"step-{loaded}",
                    loaded,
                    ignored,
                )
                if "dataloader" in exclude:
                    self.state.data = self.mixture.start()
                    logger.info("data order restarts from the beginning (checkpoint.exclude_from_loading)")
        init_path = job.checkpoint.initial_load_path
        if init_path and self.step == 0:
            if (
                Path(init_path) / ".metadata"
            ).is_file():  # a DCP step folder (HF folders load in build_model)
                self.checkpointer.load_model_from(Path(init_path))
            logger.info("initial weights from %s", init_path)
        self._check_data_position()
        self.hub = HubPusher(job.hub if self.rank == 0 else Hub())
        self.peak = peak_flops(self.device, self.dtype)
        n_params = self.spec.num_params(self.args)
        logger.info(
            "model %s/%s: %s parameters (core %s); device %s, %s autocast; global batch %d = %d x %d accum x %d "
            "ranks; %d tokens/step",
            job.model.name, job.model.flavor, f"{n_params['total']:,}", f"{n_params['core']:,}", self.device,
            t.mixed_precision_param, self.global_batch, t.local_batch_size, self.accum, self.dp_size,
            self.global_batch * t.seq_len,
        )  # fmt: skip
        self._log_sources()

    def _on_rank0_first(self, fn):
        """Run `fn` on rank 0 (e.g. preparing the built-in corpus on first use), then on the others; an error
        on rank 0 is raised on every rank instead of leaving them waiting at a barrier."""
        if self.dp_size == 1:
            return fn()
        error = [None]
        if self.rank == 0:
            try:
                result = fn()
            except RavenError as e:
                error = [str(e)]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise RavenError(error[0])
        return result if self.rank == 0 else fn()

    def _on_every_rank(self, fn) -> None:
        """Run `fn` on every rank; a RavenError on any rank is raised on all of them (the lowest rank's)."""
        if self.dp_size == 1:
            return fn()
        error = None
        try:
            fn()
        except RavenError as e:
            error = str(e)
        errors = [None] * self.dp_size
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise RavenError(first)

    # ---- one optimizer step -----------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    @property
    def step(self) -> int:
        return self.state.step

    def _check_data_position(self) -> None:
        """Reconcile the (possibly restored) data position with this run's sources, and refuse a run whose
        sources' epochs limits cannot supply its remaining steps."""
        data, names = self.state.data, self.mixture.names
        dropped = sorted(set(data["consumed"]) - set(names))
        if dropped:
            logger.info(
                "data sources no longer in the mixture (their counts are dropped): %s", ", ".join(dropped)
            )
        data["consumed"] = {n: int(data["consumed"].get(n, 0)) for n in names}
        needed = (self.job.training.steps - self.step) * self.global_batch
        left = self.mixture.remaining(data)
        if needed > left:
            raise RavenError(
                f"the data sources' epochs limits leave {left:.0f} rows but the remaining "
                f"{self.job.training.steps - self.step} steps need {needed}; raise data.sources[].epochs "
                "(or remove it) or lower training.steps"
            )

    def _log_sources(self) -> None:
        t, total_w = self.job.training, float(self.mixture.weights.sum())
        run_rows = t.steps * self.global_batch
        for (s, folder), rows in zip(self.sources, self.train_splits):
            share = s.weight / total_w
            logger.info(
                "data source %s: %s, %d train rows (%s tokens), weight %.3g (%.1f%%)%s; this run reads ~%.3g "
                "epochs of it",
                s.name, folder, len(rows), f"{len(rows) * t.seq_len:,}", s.weight, 100 * share,
                "" if s.epochs is None else f", at most {s.epochs:g} epochs", share * run_rows / len(rows),
            )  # fmt: skip

    def tokens_per_source(self) -> dict[str, int]:
        return {n: c * self.job.training.seq_len for n, c in self.state.data["consumed"].items()}

    def next_micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t = self.job.training
        if self.train_iter is None:
            loader = build_train_loader(
                self.train_splits, self.mixture, t.local_batch_size, self.dp_rank, self.dp_size,
                self.job.data.num_workers, position=self.state.data,
            )  # fmt: skip
            self.train_iter = iter(loader)
        batches = []
        for _ in range(self.accum):
            inputs, labels = next(self.train_iter)
            batches.append((inputs.to(self.device), labels.to(self.device)))
            _, _, self.state.data = self.mixture.draw(self.state.data, t.local_batch_size * self.dp_size)
        return batches

    def forward_backward(self, batches, n: int, k: int) -> tuple[torch.Tensor, int]:
        """Accumulate gradients of the global-batch mean loss over the micro-batches and ranks; return
        (global loss, global valid tokens).

        Each micro-batch adds sum-CE / (valid tokens of the whole step on all ranks), so any split of the
        same global batch over micro-batches and ranks gives the same gradient. Data parallelism averages
        gradients over ranks, hence the backward of dp_size x that loss."""
        t = self.job.training
        valid_tokens = self._all_reduce(sum(int((labels != t.ignore_index).sum()) for _, labels in batches))
        total_loss = torch.zeros((), device=self.device)
        for m, (inputs, labels) in enumerate(batches):
            bsz = inputs.shape[0]
            seeds = [
                state_seed(t.seed, self.step, self.dp_rank + self.dp_size * (m * bsz + i)) for i in range(bsz)
            ]
            last = m == len(batches) - 1
            with self.autocast():
                logits = self.model(inputs, num_steps=(n, k), state_seeds=seeds).logits
            loss = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=t.ignore_index, reduction="sum"
            ) / max(valid_tokens, 1)
            with self._grad_sync(last):
                (loss * self.dp_size).backward()
            total_loss += loss.detach()
        if self.reducer is not None:
            self.reducer.reduce_gradients()
        return self._all_reduce(total_loss), valid_tokens

    def _all_reduce(self, value):
        """Sum over ranks (a Python number or a tensor); identity in one process."""
        if self.dp_size == 1:
            return value
        tensor = torch.as_tensor(
            value, dtype=torch.float64 if isinstance(value, int) else None, device=self.device
        )
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return int(tensor.item()) if isinstance(value, int) else tensor

    def _grad_sync(self, sync: bool):
        """Gradient accumulation: communicate only on the last micro-batch of a step."""
        if sync or self.dp_size == 1:
            return contextlib.nullcontext()
        if self.reducer is not None:
            return self.reducer.no_sync()
        self.model.set_requires_gradient_sync(False)
        return _restore_gradient_sync(self.model)

    def train_step(self, batches) -> dict:
        t = self.job.training
        n, k = self.spec.sample_depth(self.args, t.seed, self.step)
        total_loss, valid_tokens = self.forward_backward(batches, n, k)
        freq = self.job.metrics.telemetry_freq
        telemetry = freq > 0 and (self.step + 1) % freq == 0
        before = snapshot_params(self.optimizer) if telemetry else None
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), t.max_norm if t.max_norm > 0 else math.inf, foreach=True
        )
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = float(total_loss), float(grad_norm)
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if skipped and t.on_nonfinite == "stop":
            raise RavenError(
                f"non-finite loss ({loss_value}) or gradient norm ({norm_value}) at step {self.step + 1}; "
                "lower optimizer.lr, or set training.on_nonfinite = 'skip' to skip such steps"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        if skipped:
            logger.warning("step %d: non-finite loss or gradient norm; optimizer step skipped", self.step + 1)
        else:
            self.optimizer.step()
            precompute_scales(self.model, self.job.float8)
        self.optimizer.zero_grad(set_to_none=True)
        if telemetry:
            self._telemetry(batches[0][0], n, k, before)
        with warnings.catch_warnings():  # torch warns when the very first optimizer step was skipped
            warnings.filterwarnings("ignore", message="Detected call of")
            self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += valid_tokens
        return {
            "loss": loss_value, "grad_norm": norm_value, "lr": lr, "n": n, "k": k,
            "tokens": valid_tokens, "skipped": skipped,
        }  # fmt: skip

    def _telemetry(self, inputs: torch.Tensor, n: int, k: int, before: dict) -> None:
        """Recurrence and optimizer telemetry of this rank's first micro-batch (not all-reduced)."""
        stats = update_stats(self.optimizer, before)
        seeds = [
            state_seed(self.job.training.seed, self.step, self.dp_rank + self.dp_size * i)
            for i in range(len(inputs))
        ]
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:  # the telemetry calls the model's pieces directly, outside FSDP's forward hooks
            unit.unshard()
        with self.autocast():
            stats |= recurrence_stats(self.model, inputs, n, k, state_seeds=seeds)
        for unit in units:
            unit.reshard()
        warning = collapse_warning(stats)
        if warning:
            logger.warning("step %d: %s", self.step + 1, warning)
        self.metrics.log_telemetry(self.step + 1, stats)
        return stats

    # ---- validation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[int, float]:
        """Per-depth validation loss: over the first `validation.steps` batches of each source's val split,
        then the mixture-weighted mean over sources (one source: its loss). Each source's losses are kept in
        `self.val_by_source` when there are several."""
        v, t = self.job.validation, self.job.training
        depths = [d for d in v.depths if d <= v.max_depth]
        by_source = {}
        for s, folder in self.sources:
            rows = PackedRows(folder / "val")
            batches = [
                (inputs.to(self.device), labels.to(self.device))
                for inputs, labels in val_batches(
                    rows, t.local_batch_size, self.dp_rank, self.dp_size, v.steps
                )
            ]
            if not batches:
                raise RavenError(
                    f"{folder / 'val'} (data source {s.name}) has {len(rows)} rows, fewer than one validation "
                    f"batch on every rank ({self.dp_size} x {t.local_batch_size}); prepare more data or lower "
                    "training.local_batch_size"
                )
            by_source[s.name] = self._val_losses(batches, depths)
        weights = {s.name: s.weight for s, _ in self.sources}
        total_w = sum(weights.values())
        self.val_by_source = by_source if len(by_source) > 1 else {}
        return {d: sum(weights[n] * ls[d] for n, ls in by_source.items()) / total_w for d in depths}

    def _val_losses(self, batches, depths: list[int]) -> dict[int, float]:
        t = self.job.training
        self.model.eval()
        losses = {}
        for depth in depths:
            total, count = 0.0, 0
            for b, (inputs, labels) in enumerate(batches):
                bsz = inputs.shape[0]
                seeds = [
                    state_seed(t.seed, -1, self.dp_rank + self.dp_size * (b * bsz + i)) for i in range(bsz)
                ]
                with self.autocast():
                    logits = self.model(inputs, num_steps=(depth, 0), state_seeds=seeds).logits
                total += float(
                    F.cross_entropy(
                        logits.flatten(0, 1), labels.flatten(), ignore_index=t.ignore_index, reduction="sum"
                    )
                )
                count += int((labels != t.ignore_index).sum())
            total, count = (
                float(self._all_reduce(torch.tensor(total, dtype=torch.float64, device=self.device))),
                self._all_reduce(count),
            )
            losses[depth] = total / max(count, 1)
        self.model.train()
        return losses

    # ---- the loop ----------------------------------------------------------------------------------------
    def train(self) -> dict:
        job, t = self.job, self.job.training
        ckpt = job.activation_checkpoint.mode
        window = {"tokens": 0, "flops": 0.0, "time": 0.0}
        start = time.perf_counter()
        first_loss = last = None
        reset_peak_memory(self.device)
        stop = _StopRequest()
        self._start_step = self.step
        while self.step < t.steps and not stop.requested:
            step_start = time.perf_counter()
            out = self.train_step(self.next_micro_batches())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - step_start
            first_loss = out["loss"] if first_loss is None else first_loss
            last = out
            fpt = self.spec.flops_per_token(self.args, t.seq_len, out["n"], out["k"], ckpt)
            window["tokens"] += out["tokens"]
            window["flops"] += fpt * out["tokens"]
            window["time"] += dt
            if self.step % job.metrics.log_freq == 0 or self.step == t.steps or self.step == 1:
                self._log(out, window, start)
                window = {"tokens": 0, "flops": 0.0, "time": 0.0}
            if job.validation.enable and (self.step % job.validation.freq == 0 or self.step == t.steps):
                self.metrics.log_validation(self.step, self.validate(), self.val_by_source)
            if t.time_limit_minutes and time.perf_counter() - start > 60 * t.time_limit_minutes:
                stop.requested = stop.requested or "time limit"
            if self.dp_size > 1 and self._all_reduce(int(stop.requested is not None)):
                stop.requested = stop.requested or "another rank's stop request"  # all ranks stop together
            saving = self.checkpointer.should_save(self.step, t.steps)
            if saving or (stop.requested and job.checkpoint.enable):
                self.checkpointer.save(self.step, block=bool(stop.requested) or self.step == t.steps)
                if self.step < t.steps and job.hub.repo_id and job.hub.push_every_n_checkpoints:
                    self.checkpointer.wait()  # on every rank: the export reads the finished checkpoint
                    self.hub.maybe_push(self._exporter(self.step, from_checkpoint=True), self.step)
        if self.step == t.steps and (job.checkpoint.export_hf_at_end or job.hub.repo_id):
            export = self._exporter(self.step, from_checkpoint=job.checkpoint.enable)
            if job.checkpoint.export_hf_at_end and self.rank == 0:
                export()
            self.hub.maybe_push(export, self.step, is_final=True)
        self.checkpointer.wait()
        self.hub.close(timeout=None)
        stop.restore()
        self.metrics.close()
        if stop.requested:
            logger.info("stopped by %s at step %d%s", stop.requested, self.step,
                        "" if job.checkpoint.enable else " (checkpointing is off: nothing saved)")  # fmt: skip
        elif last is not None:
            logger.info("done: %d steps, loss %.4f -> %.4f, %.1f s", t.steps, first_loss, last["loss"],
                        time.perf_counter() - start)  # fmt: skip
        else:
            logger.info("nothing to do: the checkpoint is already at step %d of %d", self.step, t.steps)
        return {"first_loss": first_loss, "last_loss": last and last["loss"], "steps": self.step}

    def _exporter(self, step: int, from_checkpoint: bool):
        """A function writing the Hugging Face export of `step` to <run>/hf/step-N (once) and returning it.
        From the step's checkpoint when there is one (safe in the background), else from the live model."""
        out = self.folder / "hf" / f"step-{step}"
        dtype = torch.bfloat16 if self.job.checkpoint.export_dtype == "bfloat16" else torch.float32
        tokenizer = repo_path(self.job.data.tokenizer)

        def export() -> Path:
            if not (out / "config.json").is_file():
                if from_checkpoint:
                    self.checkpointer.wait()
                    export_from_checkpoint(self.folder, step, out, dtype, tokenizer)
                else:
                    export_hf(self.model, self.args, out, tokenizer, dtype)
                logger.info("Hugging Face export written: %s", out)
            return out

        return export

    def _log(self, out: dict, window: dict, start: float) -> None:
        elapsed = time.perf_counter() - start
        tps = window["tokens"] / max(window["time"], 1e-9)
        flops_per_s = window["flops"] / max(window["time"], 1e-9)
        mem, kind = peak_memory_gib(self.device)
        self.metrics.log_train(
            {
                "step": self.step,
                "loss": out["loss"],
                "lr": out["lr"],
                "grad_norm": out["grad_norm"],
                "num_steps_no_grad": out["n"],
                "num_steps_with_grad": out["k"],
                "tokens_per_second": tps,
                "tokens_seen": self.state.tokens_seen,
                "tokens_per_source": self.tokens_per_source(),
                "tflops": flops_per_s / 1e12,
                "mfu": None if self.peak is None else flops_per_s / self.peak / self.dp_size,
                "memory_gib": mem,
                "memory_kind": kind,
                "elapsed_seconds": elapsed,
                "eta_seconds": elapsed
                / (self.step - self._start_step)
                * (self.job.training.steps - self.step),
                "skipped": out["skipped"],
            }
        )


class _StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's pre-emption warning) set a flag; the loop saves and exits at the next step
    boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _restore_gradient_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        format="[raven %(asctime)s] %(message)s" if rank == 0 else f"[raven rank {rank} %(asctime)s] %(message)s",
        datefmt="%H:%M:%S", level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()

    def body() -> None:
        job = parse_args(argv, default_config=str(DEFAULT_CONFIG))
        if job.job.dry_run:
            from raven_titan.dry_run import dry_run

            dry_run(job)
            return
        state = {"trainer": Trainer(job)}
        state["trainer"].train()
        teardown(state)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
