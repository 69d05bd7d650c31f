"""Publishing to the Hugging Face Hub: the `[hub]` config section, `push_folder` and the trainer's `HubPusher`.

Everything goes through `huggingface_hub` (`HfApi.create_repo`, `create_branch`, `upload_folder`). The token is
resolved by `huggingface_hub` itself (`HF_TOKEN` or the saved `hf auth login`): this module never reads, logs or
stores it, and scrubs token-shaped strings out of every error message it produces.

Failures: transient ones (HTTP 408/429/5xx, connection errors, timeouts) are retried with exponential backoff;
authentication, permission and not-found errors (401/403/404) and bad input are reported at once. With
`HF_HUB_OFFLINE=1` nothing is sent and the error says so. `HubPusher` runs pushes in a background thread, logs the
outcome and never raises into the training loop. Nothing here modifies or deletes the folder it pushes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raven_titan.config.job_config import Hub
from raven_titan.errors import RavenError

logger = logging.getLogger("raven_titan")

OFFLINE_MESSAGE = "offline mode (HF_HUB_OFFLINE=1): nothing pushed; unset it to push"
DEFAULT_MESSAGE = "Upload with raven_titan"
MAX_BACKOFF_SECONDS = 300.0
"""Cap on a single backoff wait, however many retries are configured."""

_TRANSIENT_STATUS = (408, 429)
_SECRET = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{20,}|(?i:bearer)\s+\S+")


def _one_line(text: object, limit: int = 400) -> str:
    """Collapse whitespace, drop anything token-shaped, and shorten."""
    line = _SECRET.sub("<redacted>", " ".join(str(text).split()))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_offline() -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), as it reads it."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def check_repo_id(repo_id: str) -> None:
    """Raise RavenError unless `repo_id` looks like ORG/NAME as the Hub accepts it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise RavenError(f"hub repo id {repo_id!r} must look like ORG/NAME (e.g. my-org/raven-3.5b)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise RavenError(f"hub repo id {repo_id!r} is not valid: {_one_line(exc, 200)}") from None


def _classify(exc: BaseException, repo_id: str) -> tuple[bool, str]:
    """(transient?, one-line reason) for an exception raised by huggingface_hub during a push."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        server = _one_line(exc.server_message or "", 200)
        detail = f" ({server})" if server else ""
        if status == 401:
            return False, (
                f"authentication failed (HTTP 401){detail}: set HF_TOKEN or run `hf auth login` with a token that "
                f"can write to {repo_id}"
            )
        if status == 403:
            return False, f"permission denied (HTTP 403){detail}: the token cannot write to {repo_id}"
        if status == 404:
            return False, f"not found (HTTP 404){detail}: check the repo id {repo_id} and the revision"
        transient = status is not None and (status in _TRANSIENT_STATUS or status >= 500)
        return transient, f"HTTP {status} from the Hub{detail}" if status else _one_line(exc)
    if isinstance(exc, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)):
        return True, f"network error: {type(exc).__name__}: {_one_line(exc, 200)}"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True, f"network error: {type(exc).__name__}: {_one_line(exc, 200)}"
    return False, f"{type(exc).__name__}: {_one_line(exc, 300)}"


def push_folder(
    folder: Path | str,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    message: str = DEFAULT_MESSAGE,
    max_retries: int = 3,
    backoff_seconds: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Upload every file of `folder` to the Hub model repo `repo_id` in one commit; return the commit URL.

    Creates the repository if needed (`private` applies only then) and, when `revision` names a branch other than
    main, the branch (from the head of main). The three calls are idempotent and retried together: up to
    `max_retries` more attempts after a transient failure, waiting `backoff_seconds`, then twice that, and so on
    (each wait through `sleep`). Raises RavenError with a one-line message (never the token) on a permanent or final
    failure, and at once, sending nothing, in offline mode. Only reads `folder`.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if max_retries < 0 or backoff_seconds < 0:
        raise RavenError(
            f"hub push: max_retries ({max_retries}) and backoff_seconds ({backoff_seconds}) must be >= 0"
        )
    if not folder.is_dir():
        raise RavenError(f"{folder}: no such folder to push")
    if not any(p.is_file() for p in folder.rglob("*")):
        raise RavenError(f"{folder}: the folder has no files: nothing to push")
    if is_offline():
        raise RavenError(OFFLINE_MESSAGE)

    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    api = HfApi(library_name="raven_titan")
    branch = revision if revision and revision != "main" else None
    where = f"{repo_id}@{branch}" if branch else repo_id
    attempts = max_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=branch,
                commit_message=message or DEFAULT_MESSAGE,
            )
            return str(info.commit_url or info.oid)
        except OfflineModeIsEnabled:
            raise RavenError(OFFLINE_MESSAGE) from None
        except Exception as exc:
            transient, reason = _classify(exc, repo_id)
            if not transient or attempt == attempts:
                after = f" after {attempt} attempts" if transient and attempt > 1 else ""
                raise RavenError(f"hub push of {folder} to {where} failed{after}: {reason}") from exc
            delay = min(backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
            logger.warning(
                "hub push to %s: attempt %d/%d failed (%s); retrying in %.1f s",
                where,
                attempt,
                attempts,
                reason,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class PushResult:
    """Outcome of one `HubPusher` request: `detail` is the commit URL, the error message, or why it was skipped."""

    step: int
    ok: bool
    detail: str
    skipped: bool = False


@dataclass
class _Request:
    folder: Path
    step: int
    revision: str | None
    message: str


class HubPusher:
    """Pushes checkpoint exports during training without ever raising into the training loop.

    `maybe_push(folder, step, is_final)` is called at every checkpoint save (on the rank that writes exports). It
    counts the saves and, when the config asks for this one (every `push_every_n_checkpoints`-th save, or the final
    save with `push_at_end`), hands the folder to a background thread. `folder` may be a callable returning the
    folder: it is called (in the caller's thread) only when a push is due, e.g. to write an export lazily.

    One push runs at a time. A request arriving while one runs waits in a single pending slot; a newer request
    replaces a waiting one (coalescing: the newest state wins, the replaced step is logged and recorded as skipped,
    so a slow Hub never piles up work or blocks training). Outcomes are logged on the "raven_titan" logger and kept
    in `results`. `close(timeout)` waits for the pending and running pushes at the end of training.

    The folder is only read. It must stay in place until its push ends: a folder deleted meanwhile (e.g. rotated
    away) makes that push fail, which is logged like any other failure.
    """

    def __init__(self, cfg: Hub, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.repo_id)
        self.results: list[PushResult] = []
        self._sleep = sleep
        self._cond = threading.Condition()
        self._pending: _Request | None = None
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._saves = 0
        if not self.enabled:
            return
        check_repo_id(cfg.repo_id)
        if cfg.push_every_n_checkpoints < 0 or cfg.max_retries < 0 or cfg.backoff_seconds < 0:
            raise RavenError("[hub] push_every_n_checkpoints, max_retries and backoff_seconds must be >= 0")
        if not (cfg.push_at_end or cfg.push_every_n_checkpoints):
            logger.warning("hub: repo_id %s is set but push_at_end is off and push_every_n_checkpoints is 0: "
                           "nothing will be pushed", cfg.repo_id)  # fmt: skip
        if is_offline():
            logger.warning("hub: %s; pushes to %s will fail", OFFLINE_MESSAGE, cfg.repo_id)

    def due(self, saves: int, is_final: bool) -> bool:
        """Whether the `saves`-th checkpoint save (1-based) is to be pushed."""
        n = self.cfg.push_every_n_checkpoints
        return self.enabled and ((is_final and self.cfg.push_at_end) or (n > 0 and saves % n == 0))

    def maybe_push(
        self, folder: Path | str | Callable[[], Path | str], step: int, is_final: bool = False
    ) -> bool:
        """Count a checkpoint save and schedule a push if one is due; return whether one was scheduled. Never raises."""
        try:
            if not self.enabled or self._closed:
                return False
            self._saves += 1
            if not self.due(self._saves, is_final):
                return False
            path = Path(folder() if callable(folder) else folder)
            self.submit(path, step, is_final)
            return True
        except Exception as exc:  # never into the training loop
            logger.error("hub push of step %d not scheduled (training continues): %s", step, _one_line(exc))
            return False

    def submit(self, folder: Path | str, step: int, is_final: bool = False) -> None:
        """Schedule a push of `folder` for `step` now, whatever the schedule says."""
        revision = f"step-{step}" if self.cfg.revision_per_step else None
        message = f"raven_titan: step {step}" + (" (final)" if is_final else "")
        request = _Request(Path(folder), step, revision, message)
        with self._cond:
            if self._closed:
                raise RavenError("hub pusher is closed")
            if self._pending is not None:
                old = self._pending
                logger.warning(
                    "hub push of step %d skipped: superseded by step %d before it started", old.step, step
                )
                self.results.append(PushResult(old.step, False, f"superseded by step {step}", skipped=True))
            self._pending = request
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="raven-hub-push", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        logger.info(
            "hub push of step %d to %s%s scheduled",
            step,
            self.cfg.repo_id,
            f"@{revision}" if revision else "",
        )

    def _worker(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                request, self._pending = self._pending, None
                self._busy = True
            result = PushResult(request.step, False, "")
            try:
                url = push_folder(
                    request.folder,
                    self.cfg.repo_id,
                    private=self.cfg.private,
                    revision=request.revision,
                    message=request.message,
                    max_retries=self.cfg.max_retries,
                    backoff_seconds=self.cfg.backoff_seconds,
                    sleep=self._sleep,
                )
                result = PushResult(request.step, True, url)
                logger.info("hub push of step %d done: %s", request.step, url)
            except Exception as exc:  # a push failure is reported, never fatal
                detail = (
                    str(exc) if isinstance(exc, RavenError) else _one_line(f"{type(exc).__name__}: {exc}")
                )
                result = PushResult(request.step, False, detail)
                logger.error("hub push of step %d failed (training continues): %s", request.step, detail)
            finally:
                with self._cond:
                    self.results.append(result)
                    self._busy = False
                    self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """Whether a push is running or waiting."""
        with self._cond:
            return self._busy or self._pending is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None = no limit) until no push runs or waits; return whether none does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking requests and wait up to `timeout` seconds (None = no limit) for the waiting and running
        pushes; return whether they all ended. Never raises."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.wait(timeout):
            logger.warning("hub push still running after %.0f s; not waiting for it any longer", timeout)
            return False
        if self.enabled and self.results:
            ok = sum(r.ok for r in self.results)
            logger.info("hub: %d of %d pushes to %s succeeded", ok, len(self.results), self.cfg.repo_id)
        return True

    def __enter__(self) -> HubPusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
