"""One record, several sinks: a one-line console log, `metrics.jsonl` in the run folder, and optionally
TensorBoard and Weights & Biases (each an optional install, imported only when enabled)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from raven_titan.errors import RavenError

logger = logging.getLogger("raven_titan")


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_train_line(r: dict[str, Any]) -> str:
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    return (
        f"step {r['step']:>6}  loss {r['loss']:7.4f}  lr {r['lr']:.2e}  gnorm {r['grad_norm']:6.3f}  "
        f"depth {r['num_steps_no_grad']}+{r['num_steps_with_grad']}  "
        f"tok/s {r['tokens_per_second']:9,.0f}  TFLOP/s {r['tflops']:7.3f}  mfu {mfu}  "
        f"mem {r['memory_gib']:.2f}GiB({r['memory_kind']})  eta {_fmt_eta(r['eta_seconds'])}"
    )


def format_val_table(step: int, losses: dict[int, float]) -> str:
    depths = "  ".join(f"{d:>7}" for d in losses)
    loss = "  ".join(f"{v:7.4f}" for v in losses.values())
    ppl = "  ".join(f"{math.exp(min(v, 50)):7.2f}" for v in losses.values())
    return f"validation @ step {step}\n  depth {depths}\n  loss  {loss}\n  ppl   {ppl}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a record as `kind/name` scalars; nested tables flatten to `kind/name/key`, except
    per-depth validation values, which read `validation/val_loss_d<depth>` (per source:
    `validation/val_loss_by_source/<source>_d<depth>`)."""
    kind = record.get("kind", "train")
    out: dict[str, float] = {}

    def add(name: str, value: Any, depth_keys: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                nested = isinstance(v, dict)
                add(f"{name}/{k}" if nested or not depth_keys else f"{name}_d{k}", v, depth_keys)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)

    for key, value in record.items():
        if key not in ("step", "kind"):
            add(f"{kind}/{key}", value, key.startswith("val_"))
    return out


class MetricsLogger:
    def __init__(self, folder: Path, enable_jsonl: bool = True, cfg=None, config: dict | None = None) -> None:
        """`cfg` is the `[metrics]` section (TensorBoard / W&B switches); `config` the resolved job config
        given to W&B. Pass enable_jsonl=False and cfg=None on ranks other than 0."""
        self.path = folder / "metrics.jsonl" if enable_jsonl else None
        self._file = open(self.path, "a") if self.path else None  # noqa: SIM115
        self._tb = self._wandb = None
        if cfg is not None and cfg.enable_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RavenError(
                    "metrics.enable_tensorboard needs the tensorboard package: pip install tensorboard==2.21.0"
                ) from None
            self._tb = SummaryWriter(log_dir=str(folder / "tb"))
        if cfg is not None and cfg.enable_wandb:
            try:
                import wandb
            except ImportError:
                raise RavenError(
                    "metrics.enable_wandb needs the wandb package: pip install wandb==0.31.0"
                ) from None
            folder.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=cfg.wandb_project, dir=str(folder), mode=cfg.wandb_mode, config=config or {}
            )

    def _write(self, record: dict[str, Any]) -> None:
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None or self._wandb is not None:
            values = {k: v for k, v in scalars(record).items() if math.isfinite(v)}
            if self._tb is not None:
                for key, value in values.items():
                    self._tb.add_scalar(key, value, global_step=record["step"])
            if self._wandb is not None:
                self._wandb.log(values, step=record["step"])

    def log_train(self, record: dict[str, Any]) -> None:
        self._write({"kind": "train", **record})
        logger.info(format_train_line(record))

    def log_telemetry(self, step: int, stats: dict[str, float]) -> None:
        self._write({"kind": "telemetry", "step": step, **stats})
        logger.info(
            "telemetry step %d: state norm %.3f  rel residual %.4f  token corr latent %.3f / hidden %.3f",
            step, stats["state_norm"], stats["rel_residual"], stats["latent_token_corr"],
            stats["hidden_token_corr"],
        )  # fmt: skip

    def log_validation(
        self, step: int, losses: dict[int, float], by_source: dict[str, dict[int, float]] | None = None
    ) -> None:
        """Per-depth validation losses (and, for a mixture, each source's)."""
        record = {
            "kind": "validation",
            "step": step,
            "val_loss": {str(d): v for d, v in losses.items()},
            "val_ppl": {str(d): math.exp(min(v, 50)) for d, v in losses.items()},
        }
        if by_source:
            record["val_loss_by_source"] = {
                n: {str(d): v for d, v in ls.items()} for n, ls in by_source.items()
            }
        self._write(record)
        logger.info(format_val_table(step, losses))
        for name, ls in (by_source or {}).items():
            logger.info("  %-14s %s", name[:14], "  ".join(f"{v:7.4f}" for v in ls.values()))

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
