"""Checkpoints that never lose work, on torch.distributed.checkpoint (DCP).

Layout: `<run>/<checkpoint.folder>/step-N/` (DCP files + `.metadata`). A save is written into
`step-N.tmp-<pid>` and renamed to `step-N` only once complete, so a crash or kill during a save leaves the
previous `step-N` as the latest loadable one; leftover temporary folders are ignored and cleaned up.
Everything needed for a bit-exact resume is saved: model, optimizer, LR schedule, per-rank data-loader
position, train state and RNG states (the recurrence depth and the latent noise are functions of
(seed, step, sample), so they need no state of their own).
"""

from __future__ import annotations

import contextlib
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
    """Counters of the training loop (the step drives the depth sampler, schedule and noise seeds)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


class RNGState(Stateful):
    """torch's CPU (and CUDA) generator states of this rank."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every call without a process group; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves and restores `states` (name -> Stateful or plain dict). Names ending in `@rank` are made
    rank-specific (per-rank state such as data-loader positions), since DCP keeps one copy of a key."""

    def __init__(self, cfg, run_folder: Path, states: dict[str, Any]) -> None:
        self.cfg = cfg
        self.folder = Path(run_folder) / cfg.folder
        self.states = {name.replace("@rank", f"_rank{_rank()}"): s for name, s in states.items()}

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

    def save(self, step: int) -> Path:
        final = self.folder / f"step-{step}"
        if final.is_dir() and (final / ".metadata").is_file():
            return final  # already saved (e.g. the step a run resumed from)
        tmp = self.folder / f"step-{step}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        with _single_process_ok():
            dcp.save(self.states, checkpoint_id=str(tmp))
        _barrier()
        if _rank() == 0:
            tmp.rename(final)  # atomic: the step folder appears only when complete
            self._purge()
        _barrier()
        logger.info("checkpoint saved: %s", final)
        return final

    def _purge(self) -> None:
        for p in self.folder.iterdir():
            if p.name.startswith("step-") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)  # a save that was interrupted
        for step in self.complete_steps()[: -self.cfg.keep_latest_k]:
            shutil.rmtree(self.folder / f"step-{step}", ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------------------------
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
        states = {k: v for k, v in self.states.items() if k.split("_rank")[0] not in exclude}
        try:
            with _single_process_ok():
                dcp.load(states, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001 - DCP raises many types; the message is what matters
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RavenError(
                f"could not load checkpoint {path}: {first}; if the model or layout changed, start a new "
                "job.dump_folder or list the failing state in checkpoint.exclude_from_loading"
            ) from None
        return step
