"""Hub publishing through the real huggingface_hub client code path, its HTTP client pointed at an in-process
mock of the Hub API: repository created, files uploaded, branches per step, retries with backoff, permanent
errors, offline mode, a failing push that leaves training running, the token kept out of logs and run folder, and
the push command."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from raven_titan.config.job_config import Hub as HubConfig
from raven_titan.errors import RavenError
from raven_titan.hf import push as push_cli
from raven_titan.hf.hub import OFFLINE_MESSAGE, HubPusher, push_folder

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "raven-org/raven-test"


class MockHub:
    """Answers the Hub API routes that create_repo, create_branch and upload_folder use, and records them.

    `fail[route]` is a list of status codes answered (in order) before the route works; `always[route]` is a status
    answered every time. Routes: "create", "branch", "preupload", "commit".
    """

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []
        self.repos: dict[str, dict] = {}
        self.branches: set[tuple[str, str]] = set()
        self.commits: list[dict] = []
        self.fail: dict[str, list[int]] = {}
        self.always: dict[str, int] = {}
        self.hold: threading.Event | None = None  # if set: the first create request waits for it
        self.entered = threading.Event()  # set when that request arrived

    def routes(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]

    def _injected(self, route: str) -> httpx2.Response | None:
        status = self.always.get(route) or (self.fail[route].pop(0) if self.fail.get(route) else None)
        if status is None:
            return None
        return httpx2.Response(status, json={"error": f"injected {status} on {route}"})

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and request.url.path == "/api/repos/create":
            if self.hold is not None and not self.entered.is_set():
                self.entered.set()
                assert self.hold.wait(10)
            if (bad := self._injected("create")) is not None:
                return bad
            body = json.loads(request.content)
            repo = f"{body['organization']}/{body['name']}"
            if repo in self.repos:
                # the real Hub's 409 carries the url too: create_repo(exist_ok=True) returns it
                url = f"https://huggingface.co/{repo}"
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": url})
            self.repos[repo] = body
            self.branches.add((repo, "main"))
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})
        if request.method == "POST" and len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo, route, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if repo not in self.repos:
                return httpx2.Response(
                    404, json={"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"}
                )
            if (bad := self._injected(route)) is not None:
                return bad
            if route == "branch":
                if (repo, rev) in self.branches:
                    return httpx2.Response(409, json={"error": "Reference already exists"})
                self.branches.add((repo, rev))
                return httpx2.Response(200, json={})
            if (repo, rev) not in self.branches:
                return httpx2.Response(
                    404, json={"error": "Invalid rev id"}, headers={"X-Error-Code": "RevisionNotFound"}
                )
            if route == "preupload":
                files = json.loads(request.content)["files"]
                return httpx2.Response(
                    200,
                    json={
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                        ]
                    },
                )
            if route == "commit":
                lines = [json.loads(line) for line in request.content.splitlines()]
                files = {
                    item["value"]["path"]: base64.b64decode(item["value"]["content"])
                    for item in lines
                    if item["key"] == "file"
                }
                header = next(item["value"] for item in lines if item["key"] == "header")
                oid = uuid.uuid4().hex + "00000000"
                self.commits.append(
                    {"repo": repo, "revision": rev, "files": files, "summary": header["summary"]}
                )
                return httpx2.Response(
                    200, json={"commitOid": oid, "commitUrl": f"https://huggingface.co/{repo}/commit/{oid}"}
                )
        return httpx2.Response(404, json={"error": "not found"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A MockHub behind huggingface_hub's shared client (with the library's own request hook, as in production).
    Xet is disabled so that commits go through the single-commit path, whose only retries are ours."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login" / "token"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "t" * 34)
    server = MockHub()
    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(server), event_hooks={"request": [hf_request_event_hook]}
        )
    )
    yield server
    huggingface_hub.set_client_factory(default_client_factory)


@pytest.fixture
def export(tmp_path) -> Path:
    folder = tmp_path / "run" / "hf" / "step-10"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "huginn_raven"}\n')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "tokenizer" / "tokenizer.json").write_text("{}\n")
    return folder


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer/tokenizer.json"}


@pytest.mark.parametrize("xet", [False, True], ids=["single-commit", "xet-pipeline"])
def test_push_creates_the_repo_and_uploads_every_file(hub, export, monkeypatch, xet):
    # with hf_xet installed, upload_folder takes the pipelined path (regular files need no Xet route)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    before = tree_hash(export)
    url = push_folder(export, REPO_ID, private=True, revision=None, message="step 10")
    assert REPO_ID in hub.repos and hub.repos[REPO_ID]["visibility"] == "private"
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == REPO_ID and commit["revision"] == "main" and commit["summary"] == "step 10"
    assert set(commit["files"]) == EXPORT_FILES
    assert commit["files"]["model.safetensors"] == (export / "model.safetensors").read_bytes()
    assert url.startswith(f"https://huggingface.co/{REPO_ID}/commit/")
    assert tree_hash(export) == before  # only read
    # pushing again to an existing repo is fine (create_repo answers 409, exist_ok)
    push_folder(export, REPO_ID, private=True, revision=None, message="again")
    assert len(hub.commits) == 2


def test_revision_per_step_pushes_to_a_step_branch(hub, export):
    pusher = HubPusher(HubConfig(repo_id=REPO_ID, push_every_n_checkpoints=1, revision_per_step=True))
    assert pusher.maybe_push(export, step=10)
    assert pusher.close(timeout=10)
    assert pusher.results[-1].ok, pusher.results
    assert ("POST", f"/api/models/{REPO_ID}/branch/step-10") in hub.routes()
    assert (REPO_ID, "step-10") in hub.branches
    assert [c["revision"] for c in hub.commits] == ["step-10"]
    assert set(hub.commits[0]["files"]) == EXPORT_FILES
    # the branch already existing (409) is fine too
    push_folder(export, REPO_ID, revision="step-10", message="again")
    assert [c["revision"] for c in hub.commits] == ["step-10", "step-10"]


def test_transient_500s_are_retried_with_backoff(hub, export):
    hub.fail["commit"] = [500, 500]
    sleeps: list[float] = []
    url = push_folder(export, REPO_ID, message="m", max_retries=3, backoff_seconds=2.0, sleep=sleeps.append)
    commit_calls = [r for r in hub.routes() if r[1].endswith("/commit/main")]
    assert len(commit_calls) == 3 and len(hub.commits) == 1
    assert sleeps == [2.0, 4.0]
    assert url.startswith("https://huggingface.co/")


def test_retries_run_out_with_a_one_line_error(hub, export):
    hub.always["commit"] = 503
    sleeps: list[float] = []
    with pytest.raises(RavenError, match=r"failed after 3 attempts: HTTP 503") as err:
        push_folder(export, REPO_ID, message="m", max_retries=2, backoff_seconds=0.5, sleep=sleeps.append)
    assert "\n" not in str(err.value)
    assert sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status, needle", [(403, "permission denied (HTTP 403)"), (401, "HTTP 401")])
def test_auth_and_permission_errors_are_not_retried(hub, export, status, needle):
    hub.always["commit"] = status
    sleeps: list[float] = []
    with pytest.raises(RavenError) as err:
        push_folder(export, REPO_ID, message="m", max_retries=3, sleep=sleeps.append)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert sleeps == []
    assert sum(r[1].endswith("/commit/main") for r in hub.routes()) == 1


def test_offline_mode_sends_nothing(hub, export, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, into constants.HF_HUB_OFFLINE (is_offline_mode() returns
    # it): patching the constant is what works in-process; the subprocess test below sets the real variable.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RavenError) as err:
        push_folder(export, REPO_ID, message="m", sleep=pytest.fail)
    assert str(err.value) == OFFLINE_MESSAGE
    assert hub.requests == []


def test_offline_raised_by_the_library_mid_push_is_not_retried(hub, export):
    # The library's request hook raises OfflineModeIsEnabled when offline mode turns on after our check.
    hooked = []

    def hook(request):
        hooked.append(request.url.path)
        constants.HF_HUB_OFFLINE = True  # restored by the hub fixture's monkeypatch

    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(hub), event_hooks={"request": [hook, hf_request_event_hook]}
        )
    )
    with pytest.raises(RavenError) as err:
        push_folder(export, REPO_ID, message="m", sleep=pytest.fail)
    assert str(err.value) == OFFLINE_MESSAGE
    assert hub.requests == [] and len(hooked) == 1


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys, httpx2, huggingface_hub
    sent = []
    def handler(request):
        sent.append(request.url.path)
        return httpx2.Response(500)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    from raven_titan.hf.push import main
    code = main([sys.argv[1], "--repo-id", "raven-org/x", "--backoff-seconds", "0"])
    print("requests sent:", len(sent))
    sys.exit(code)
    """
)


def test_offline_env_var_gives_a_clear_one_line_error(export, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(export)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert out.stderr.strip() == f"error: {OFFLINE_MESSAGE}"
    assert "requests sent: 0" in out.stdout


def test_a_failing_push_never_stops_training(hub, export, caplog):
    hub.always["create"] = 500  # the Hub is down for the whole run
    before = tree_hash(export)
    released = threading.Event()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # backoff waits last until the training loop has finished
        sleeps.append(seconds)
        released.wait(10)

    cfg = HubConfig(repo_id=REPO_ID, push_every_n_checkpoints=2, max_retries=2, backoff_seconds=0.5)
    pusher = HubPusher(cfg, sleep=sleep)
    caplog.set_level(logging.INFO, logger="raven_titan")
    losses, scheduled = [], []
    for step in range(1, 9):  # a "training step", then a checkpoint save; the last save is the final one
        losses.append(sum(i * i for i in range(10_000)) / step)
        scheduled.append(pusher.maybe_push(export, step, is_final=step == 8))
    assert len(losses) == 8
    assert scheduled == [False, True, False, True, False, True, False, True]
    assert pusher.busy  # the loop finished while a push was still failing and retrying
    released.set()
    assert pusher.close(timeout=20)

    failed = [r for r in pusher.results if not r.ok and not r.skipped]
    assert failed and not any(r.ok for r in pusher.results)
    assert failed[-1].step == 8  # the newest request always runs; waiting ones in between may be superseded
    assert all("failed after 3 attempts: HTTP 500" in r.detail for r in failed)
    assert sum(route == ("POST", "/api/repos/create") for route in hub.routes()) == 3 * len(failed)
    assert sleeps[:2] == [0.5, 1.0]
    assert sum("failed (training continues)" in rec.getMessage() for rec in caplog.records) == len(failed)
    assert tree_hash(export) == before and hub.commits == []


def test_pusher_schedule_coalescing_and_lazy_folder(hub, export, tmp_path):
    pusher = HubPusher(HubConfig(repo_id=REPO_ID, push_at_end=True, push_every_n_checkpoints=0))
    calls = []

    def lazy() -> Path:
        calls.append(1)
        return export

    assert not pusher.maybe_push(lazy, 5)
    assert calls == []  # not due: the export is not even written
    assert pusher.maybe_push(lazy, 10, is_final=True) and calls == [1]
    assert pusher.close(timeout=10) and [(r.step, r.ok) for r in pusher.results] == [(10, True)]
    assert [set(c["files"]) for c in hub.commits] == [EXPORT_FILES]
    assert not pusher.maybe_push(export, 11, is_final=True)  # closed

    # one push at a time; a request that finds another waiting replaces it (the newest wins)
    hub.hold = threading.Event()
    every = HubPusher(HubConfig(repo_id=REPO_ID, push_every_n_checkpoints=1))
    assert every.maybe_push(export, 1)
    assert hub.entered.wait(10)  # push 1 is running (held inside the mock)
    assert every.maybe_push(export, 2) and every.maybe_push(export, 3)
    hub.hold.set()
    assert every.close(timeout=10)
    assert [(r.step, r.ok, r.skipped) for r in every.results] == [
        (2, False, True),
        (1, True, False),
        (3, True, False),
    ]

    # a folder gone by the time it is pushed is a reported failure, not an exception
    gone = HubPusher(HubConfig(repo_id=REPO_ID))
    assert gone.maybe_push(tmp_path / "missing", 4, is_final=True)
    assert gone.close(timeout=10) and "no such folder" in gone.results[0].detail

    off = HubPusher(HubConfig())
    assert not off.enabled and not off.maybe_push(export, 1, is_final=True) and off.close(0)
    with pytest.raises(RavenError, match="ORG/NAME"):
        HubPusher(HubConfig(repo_id="no-namespace"))


def test_token_is_used_but_never_logged_or_written(hub, export, monkeypatch, caplog, capfd):
    secret = "hf_" + uuid.uuid4().hex + "Zq9"
    monkeypatch.setenv("HF_TOKEN", secret)
    run = export.parents[1]
    caplog.set_level(logging.DEBUG, logger="raven_titan")
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.fail["commit"] = [500]  # exercise the retry logging too
    pusher = HubPusher(HubConfig(repo_id=REPO_ID, push_every_n_checkpoints=1, backoff_seconds=0))
    assert pusher.maybe_push(export, 10)
    assert pusher.close(timeout=10) and pusher.results[-1].ok
    hub.always["commit"] = 403  # and the failure logging
    with pytest.raises(RavenError) as err:
        push_folder(export, REPO_ID, message="m")
    assert push_cli.main([str(export), "--repo-id", REPO_ID]) == 2

    dumped = json.dumps(dataclasses.asdict(HubConfig(repo_id=REPO_ID)))  # what a config dump would write
    assert "token" not in dumped and secret not in dumped
    auth = {r.headers.get("authorization") for r in hub.requests if r.url.path != "/api/agent-harnesses"}
    assert auth == {f"Bearer {secret}"}  # huggingface_hub found the token itself and used it
    assert any("attempt 1/4 failed" in rec.getMessage() for rec in caplog.records)  # logs were captured
    logs = "\n".join(f"{rec.getMessage()} {rec.args} {rec.exc_text}" for rec in caplog.records)
    captured = capfd.readouterr()
    for text in (logs, captured.out, captured.err, str(err.value), repr(pusher.results)):
        assert secret not in text
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_push_command_help_and_one_line_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "raven_titan.hf.push", *a], capture_output=True, text=True, env=env, timeout=60
    )
    out = run("--help")
    assert out.returncode == 0 and "--repo-id" in out.stdout and "--revision" in out.stdout
    out = run(str(tmp_path / "nope"), "--repo-id", REPO_ID)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"error: {tmp_path / 'nope'}: no such folder to push"]


def test_push_command_rejects_a_bad_repo_id_in_one_line(tmp_path, capsys):
    assert push_cli.main([str(tmp_path), "--repo-id", "not a repo"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "ORG/NAME" in err


def test_push_command_uploads(hub, export, capsys):
    assert (
        push_cli.main([str(export), "--repo-id", REPO_ID, "--private", "--revision", "v1", "--message", "hi"])
        == 0
    )
    assert capsys.readouterr().out.startswith(f"https://huggingface.co/{REPO_ID}/commit/")
    assert hub.repos[REPO_ID]["visibility"] == "private"
    assert [(c["revision"], c["summary"]) for c in hub.commits] == [("v1", "hi")]
