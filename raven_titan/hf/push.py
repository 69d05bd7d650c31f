"""Push a folder (typically a Hugging Face export of a run) to the Hugging Face Hub.

    python -m raven_titan.hf.push FOLDER --repo-id ORG/NAME [--private] [--revision BRANCH] [--message TEXT]

The token comes from HF_TOKEN or `hf auth login` (never from the command line). Errors are one line on stderr
(`error: ...`, exit 2); on success the commit URL is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raven_titan.errors import run_command
from raven_titan.hf.hub import DEFAULT_MESSAGE, push_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raven_titan.hf.push",
        description="Upload every file of FOLDER to a Hugging Face Hub model repository in one commit, creating "
        "the repository (and the branch) if needed. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument(
        "folder", metavar="FOLDER", type=Path, help="folder to upload (e.g. an export of a run)"
    )
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="Hub model repository")
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repository as private (only if it does not exist yet)",
    )
    parser.add_argument(
        "--revision", metavar="BRANCH", default=None, help="branch to push to (default: main)"
    )
    parser.add_argument("--message", default=DEFAULT_MESSAGE, help="commit message (default: %(default)r)")
    parser.add_argument(
        "--max-retries", type=int, default=3, help="retries after transient failures (default: 3)"
    )
    parser.add_argument(
        "--backoff-seconds",
        type=float,
        default=2.0,
        help="first wait between retries, doubling (default: 2.0)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        url = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            message=args.message,
            max_retries=args.max_retries,
            backoff_seconds=args.backoff_seconds,
        )
        print(url)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
