"""The project's error type: one line that says what is wrong, where, and how to fix it."""


class RavenError(Exception):
    """A user-facing error. Command-line entry points print its message (no traceback) and exit non-zero."""
