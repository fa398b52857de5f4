"""``ckpt verify``: every byte of one step (or all) against its checksum and the structure."""

from __future__ import annotations

import argparse
from typing import Any

from ckpt.cli.render import dump_json, out, table
from ckpt.cli.source import no_checkpoint, open_reader, parse_target
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.progress import progress_bar

__all__ = ["add_parser", "verify_doc"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ckpt verify DIR[:STEP] [--step N | --all] [--json]``."""
    p = subparsers.add_parser(
        "verify",
        help="check checkpoints byte for byte against their checksums",
        description="Check the latest checkpoint of DIR (or --step N, or --all): every file "
        "against its size and checksum, every tensor header and item tree against the "
        "manifest. Exit status 1 when any step checked is corrupt.",
    )
    p.add_argument(
        "directory",
        metavar="DIR[:STEP]",
        help="checkpoint root (a path or fsspec URL), optionally :STEP (as --step)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, metavar="N", help="check step N")
    which.add_argument("--all", action="store_true", help="check every committed step")
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    p.set_defaults(func=run_verify)


def _check(reader: Any, step: int) -> dict[str, Any]:
    try:
        info = reader.verify(step)
    except CheckpointError as e:  # also a file it names gone, or the step deleted meanwhile
        return {"step": step, "status": "CORRUPT", "error": str(e), "path": e.path}
    return {"step": step, "status": "OK", "error": None, "path": info.path}


def verify_doc(reader: Any, step: int | None, every: bool, progress: bool) -> dict[str, Any]:
    """The ``ckpt verify --json`` document.

    Raises:
        CheckpointNotFoundError: Nothing is committed, or ``step`` is not.
    """
    steps = reader.all_steps()
    if every:
        chosen = steps
    elif step is not None:
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} (committed: {steps})",
                path=reader.directory,
            )
        chosen = [step]
    else:
        chosen = steps[-1:]
    if not chosen:
        raise no_checkpoint(reader.directory)
    results = []
    with progress_bar(len(chosen), "verify", enabled=progress, unit="step") as bar:
        for s in chosen:
            bar.describe(f"step {s}")
            results.append(_check(reader, s))
            bar.update()
    return {
        "directory": reader.directory,
        "ok": all(r["status"] == "OK" for r in results),
        "steps": results,
    }


def run_verify(args: argparse.Namespace) -> int:
    """``ckpt verify``."""
    target = parse_target(args.directory)
    step = args.step
    if target.step is not None:
        if args.all or (step is not None and step != target.step):
            raise ValueError(f"give the step once: {args.directory!r} names step {target.step}")
        step = target.step
    reader = open_reader(target.root, args.storage_options)
    doc = verify_doc(reader, step, args.all, args.progress)
    if args.json:
        out(dump_json(doc))
    else:
        rows = [[str(r["step"]), r["status"], r["error"] or ""] for r in doc["steps"]]
        out(table(["STEP", "STATUS", "REASON"], rows, right=(0,)))
    return 0 if doc["ok"] else 1
