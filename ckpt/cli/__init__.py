"""The ``ckpt`` command line: ``main(argv) -> int``, one module per command.

Data goes to stdout (``--json`` for a documented, stable schema: see
``docs/cli.md``), diagnostics to stderr. Exit status: 0 ok; 1 a checkpoint
problem (corrupt, missing, or ``diff`` found differences); 2 a usage error.
``python -m ckpt`` and the ``ckpt`` console script both call :func:`main`.

Each command module adds its parser with ``add_parser(subparsers)`` and sets
``func``: a callable taking the parsed ``argparse.Namespace`` and returning the
exit status. Before calling it, :func:`main` sets ``args.progress`` (whether
to show progress bars) and ``args.storage_options`` (``--storage-option``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ckpt._version import __version__
from ckpt.cli.render import note
from ckpt.errors import CheckpointError
from ckpt.gc_pause import paused_gc

__all__ = ["EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

logger = logging.getLogger("ckpt.cli")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options every command takes, before or after its name."""
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "-v", "--verbose", action="count", help="more log output (-vv: debug)", **default
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only errors on stderr; no progress", **default
    )
    parser.add_argument(
        "--no-progress",
        dest="no_progress",
        action="store_true",
        help="no progress bars (shown by default when stderr is a terminal and tqdm is installed)",
        **default,
    )
    parser.add_argument(
        "--storage-option",
        dest="storage_option",
        action="append",
        metavar="KEY=VALUE",
        help="an fsspec storage option (VALUE parsed as JSON when it is JSON); repeatable",
        **default,
    )
    if top:
        parser.set_defaults(verbose=0, quiet=False, no_progress=False, storage_option=None)


def _register_convert(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``export`` and ``import`` commands, when :mod:`ckpt.convert` is installed."""
    try:
        from ckpt.convert.cli import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
            add_export_parser,
            add_import_parser,
        )
    except ImportError:
        return
    add_export_parser(subparsers)
    add_import_parser(subparsers)


_MODULES = (
    ("ckpt.cli.listing", ("add_ls_parser", "add_info_parser")),
    ("ckpt.cli.verifying", ("add_parser",)),
    ("ckpt.cli.diffing", ("add_parser",)),
    ("ckpt.cli.pruning", ("add_parser",)),
    ("ckpt.cli.copying", ("add_parser",)),
    ("ckpt.cli.verify_resume", ("add_parser",)),
)
"""The command modules, in ``--help`` order, with the functions that add their parsers."""


def build_parser(
    *, converters: bool = True, manifest_only: bool = False
) -> argparse.ArgumentParser:
    """The ``ckpt`` argument parser, with every command.

    Args:
        converters: Also add ``export`` and ``import`` (importing :mod:`ckpt.convert`).
        manifest_only: Only ``ls`` and ``info`` (whose module imports no torch).
    """
    parser = argparse.ArgumentParser(
        prog="ckpt",
        description="Inspect, check, compare and prune ckpt checkpoints "
        "(local paths or fsspec URLs such as s3://bucket/run).",
    )
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
    _common_options(parser, top=True)
    subparsers = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        required=True,
        help="what to do (COMMAND --help for more)",
    )
    for module_name, adders in _MODULES[:1] if manifest_only else _MODULES:
        module = importlib.import_module(module_name)  # each imported only when added
        for adder in adders:
            getattr(module, adder)(subparsers)
    if converters:
        _register_convert(subparsers)
    for sub in subparsers.choices.values():
        _common_options(sub, top=False)
    return parser


_CORE_COMMANDS = frozenset({"ls", "info", "verify", "diff", "prune", "copy", "verify-resume"})
"""Commands that need no converter: for these, :mod:`ckpt.convert` is not even imported."""
_MANIFEST_ONLY = frozenset({"ls", "info"})
"""Commands that read manifests only: short, run with the cyclic collector paused, and
only their own module is imported (no torch)."""


def _command_name(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option or an option's value.

    ``None`` when unsure (an abbreviated option that may take a value, ``--``): then
    every command is registered, which is always correct, only slower.
    """
    words = iter(argv)
    for word in words:
        if word == "--storage-option":
            next(words, None)
        elif word.startswith("--") and word not in ("--verbose", "--quiet", "--no-progress"):
            if not word.startswith("--storage-option="):
                return None
        elif not word.startswith("-"):
            return word
    return None


def _storage_options(pairs: list[str] | None) -> dict[str, object] | None:
    if not pairs:
        return None
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _configure_logging(verbose: int, quiet: bool) -> logging.Handler:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO)[min(verbose, 1)]
    if verbose >= 2:
        level = logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("ckpt: %(levelname)s: %(message)s"))
    root = logging.getLogger("ckpt")
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckpt`` command line.

    Args:
        argv: The arguments after the program name (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status: 0 ok, 1 a checkpoint problem, 2 a usage error.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    name = _command_name(words)
    # With torch loaded, one full pass of the cyclic collector walks every object torch
    # made (about 60 ms); parsing and the manifest-only commands make no cycles worth it.
    with paused_gc() if name in _MANIFEST_ONLY else contextlib.nullcontext():
        return _run(words, name)


def _run(words: list[str], name: str | None) -> int:
    with paused_gc():
        parser = build_parser(
            converters=name not in _CORE_COMMANDS, manifest_only=name in _MANIFEST_ONLY
        )
        try:
            args = parser.parse_args(words)
        except SystemExit as e:  # --help, --version, or a usage error (already printed)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler = _configure_logging(args.verbose or 0, args.quiet)
    try:
        args.storage_options = _storage_options(args.storage_option)
        args.progress = not (args.no_progress or args.quiet) and sys.stderr.isatty()
        status: int = args.func(args)
        return status
    except CheckpointError as e:
        note(f"ckpt: error: {e}")
        return EXIT_PROBLEM
    except (ValueError, ImportError) as e:  # a bad URL, option or missing fsspec driver
        note(f"ckpt: error: {e}")
        return EXIT_USAGE
    except BrokenPipeError:  # stdout closed early (`ckpt info DIR | head`): not an error
        _silence_stdout()
        return EXIT_OK
    except OSError as e:
        note(f"ckpt: error: {e}")
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        note("ckpt: interrupted")
        return 130
    finally:
        logging.getLogger("ckpt").removeHandler(handler)
