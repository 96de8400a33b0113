"""Subcommands of the ``flexsparse`` command line (one module each)."""
