"""The ``flexsparse`` command. Each subcommand lives in ``flexsparse.commands.<name>``
and exposes ``add_parser(subparsers)``, which registers its parser and sets
``func(args) -> int`` as the handler.

User mistakes (bad flag values, unreadable files) end in one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("demo", "show", "ensemble", "video", "tune")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexsparse",
        description="Sparse attention patterns for video diffusion and LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"flexsparse.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"flexsparse.commands.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError, PermissionError) as exc:
        print(f"flexsparse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
