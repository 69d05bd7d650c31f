"""The project's error type: one line that says what is wrong, where, and how to fix it."""

import sys
from collections.abc import Callable


class RavenError(Exception):
    """A user-facing error. Command-line entry points print its message (no traceback) and exit non-zero."""


def run_command(body: Callable[[], int | None]) -> int:
    """Run a command's body and return its exit code: a RavenError becomes one `error: ...` line on stderr
    (exit 2), Ctrl-C exits 130. Every command-line entry point goes through here."""
    try:
        return body() or 0
    except RavenError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
