"""The ``flexsparse`` command. Each subcommand lives in ``flexsparse.commands.<name>``
and exposes ``add_parser(subparsers)``, which registers its parser and sets
``func(args) -> int`` as the handler.

The promise: a user mistake ends in one line on stderr, never a traceback.

- ``UsageError`` is a mistake in what the user asked for (a bad flag value, a path that
  is not what it must be): one line, exit code 2. Commands raise it themselves, or turn the
  library's own argument checks into it with ``user_input()`` around the calls that take
  the user's values (building a pattern from flags, loading a parameter file). Elsewhere a
  ``ValueError`` / ``TypeError`` is a programming error and keeps its traceback.
- ``OSError`` while reading or writing files (disk full, a file-size limit, a path that
  vanished): one line naming the file, exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("demo", "show", "ensemble", "video", "tune")

#: Exit codes: a mistake in the arguments; a failure of the machine (I/O).
EXIT_USAGE = 2
EXIT_IO = 1


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


@contextmanager
def user_input(what: str | None = None) -> Iterator[None]:
    """Mark a block that passes the user's values to the library: the library's argument
    checks (``ValueError`` / ``TypeError`` naming the argument) become a ``UsageError``,
    prefixed with ``what`` (e.g. the flag or file) when given.

    Use it around argument handling only, so that the same exceptions from a bug in the
    work that follows still show their traceback."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        text = " ".join(str(exc).split())
        raise UsageError(f"{what}: {text}" if what else text) from exc


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


def describe_os_error(exc: OSError) -> str:
    """One line: what failed, on which file, why (``strerror``, not the errno tuple)."""
    why = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    name = exc.filename if exc.filename is not None else getattr(exc, "flexsparse_path", None)
    return f"{why}: {str(name)!r}" if name is not None else why


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"flexsparse {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # a path the user named is not what it must be
        print(f"flexsparse {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"flexsparse {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
