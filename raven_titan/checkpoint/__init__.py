"""Checkpoints that never lose work, on torch.distributed.checkpoint (DCP).

Layout: `<run>/<checkpoint.folder>/step-N/` (DCP files + `.metadata`). A save is written into
`step-N.tmp-<pid>` and renamed to `step-N` only once complete, so a crash or kill during a save leaves the
previous `step-N` as the latest loadable one; leftover temporary folders are ignored and cleaned up.
Everything needed for a bit-exact resume is saved: model, optimizer, LR schedule, train state (step, tokens,
global data position) and RNG states. The recurrence depth and the latent noise are functions of
(seed, step, sample), and the data order of (seed, data position), so nothing is rank-specific: a checkpoint resumes
with another number of processes or another data-parallel layout (DCP reshards model and optimizer).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from raven_titan.errors import RavenError

logger = logging.getLogger("raven_titan")
# DCP warns on every call without a process group (also from its async writer thread); one process is a
# supported layout here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelState(Stateful):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class TrainState(Stateful):
    """Counters of the training loop. The step drives the depth sampler, schedule and noise seeds; the data
    position (`raven_titan.data.mixture`: global micro-batches drawn, rows consumed per source) is the same on
    every rank, so it carries over to any other data-parallel layout or batch size."""

    def __init__(self) -> None:
        self.step = self.tokens_seen = 0
        self.data: dict = {"batches": 0, "consumed": {}}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "data": json.dumps(self.data)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.data = json.loads(state["data"])


class RNGState(Stateful):
    """torch's CPU (and CUDA) generator states (rank 0's are saved). Nothing in training depends on them:
    depths, data order and latent noise are functions of (seed, step, sample)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and restores `states` (name -> Stateful). DCP keeps one copy of a key saved by every rank, so
    per-rank state would need rank-specific names; the trainer has none."""

    def __init__(self, cfg, run_folder: Path, states: dict[str, Any]) -> None:
        self.cfg = cfg
        self.folder = Path(run_folder) / cfg.folder
        self.states = states
        self._pending = None  # an asynchronous save in flight: (future, temporary folder, final folder)

    # ---- discovery ------------------------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        steps = []
        for p in self.folder.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / ".metadata").is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ---- save -----------------------------------------------------------------------------------------------
    def should_save(self, step: int, last_step: int) -> bool:
        return self.cfg.enable and (step % self.cfg.interval == 0 or step == last_step)

    def save(self, step: int, block: bool = False) -> Path:
        """Write `step` (collective). With checkpoint.async_mode = "async" the files are written in the
        background after the state is staged; the step folder appears at the next `save`/`wait` (or now, if
        `block`), so until then the previous checkpoint stays the latest."""
        self.wait()
        final = self.folder / f"step-{step}"
        if final.is_dir() and (final / ".metadata").is_file():
            return final  # already saved (e.g. the step a run resumed from)
        tmp = self.folder / f"step-{step}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        if self.cfg.async_mode == "async":
            self._pending = (dcp.async_save(self.states, checkpoint_id=str(tmp)), tmp, final)
            if block:
                self.wait()
            return final
        dcp.save(self.states, checkpoint_id=str(tmp))
        self._finalize(tmp, final)
        return final

    def wait(self) -> None:
        """Finish an asynchronous save in flight (collective)."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        self._finalize(tmp, final)

    def _finalize(self, tmp: Path, final: Path) -> None:
        _barrier()
        if _rank() == 0:
            tmp.rename(final)  # atomic: the step folder appears only when complete
            self._purge()
        _barrier()
        logger.info("checkpoint saved: %s", final)

    def _purge(self) -> None:
        for p in self.folder.iterdir():
            if p.name.startswith("step-") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)  # a save that was interrupted
        for step in self.complete_steps()[: -self.cfg.keep_latest_k]:
            shutil.rmtree(self.folder / f"step-{step}", ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------------------------
    def load_model_from(self, path: Path) -> None:
        """Initial weights from another run's checkpoint step folder (model only, any layout)."""
        try:
            dcp.load({"model": self.states["model"]}, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RavenError(f"could not load initial weights from {path}: {first}") from None

    def load(self, step: int | None = None, exclude: tuple[str, ...] = ()) -> int | None:
        """Restore the given (default: latest complete) step; returns it, or None when there is none."""
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        path = self.folder / f"step-{step}"
        if not (path / ".metadata").is_file():
            raise RavenError(
                f"checkpoint {path} does not exist or is incomplete; available steps: {self.complete_steps()}"
            )
        states = {k: v for k, v in self.states.items() if k not in exclude}
        try:
            dcp.load(states, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001 - DCP raises many types; the message is what matters
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RavenError(
                f"could not load checkpoint {path}: {first}; if the model or layout changed, start a new "
                "job.dump_folder or list the failing state in checkpoint.exclude_from_loading"
            ) from None
        return step
