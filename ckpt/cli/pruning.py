"""``ckpt prune``: delete old checkpoints by retention rules, under the writer lock."""

from __future__ import annotations

import argparse
from typing import Any

from ckpt.cli.render import dump_json, note, out
from ckpt.cli.source import open_reader, parse_root
from ckpt.policies.retention import RetentionPolicy, steps_to_delete
from ckpt.saving.writer import CheckpointWriter

__all__ = ["add_parser", "prune"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ckpt prune DIR --keep-last N [--keep-every K] [--dry-run] [--json]``."""
    p = subparsers.add_parser(
        "prune",
        help="delete old checkpoints, keeping the newest N (and every K-th)",
        description="Delete the committed checkpoints of DIR that the rules do not keep, as "
        "CheckpointManager(keep_last=N, keep_every=K) would after a save: the newest N are "
        "kept, and every step completing a multiple of K steps. Takes the writer lock (fails "
        "at once while a training run writes here). --dry-run only lists; it never writes.",
    )
    p.add_argument("directory", metavar="DIR", help="checkpoint root: a path or fsspec URL")
    p.add_argument("--keep-last", type=int, required=True, metavar="N", help="keep the N newest")
    p.add_argument(
        "--keep-every", type=int, metavar="K", help="also keep steps s with (s + 1) %% K == 0"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    p.set_defaults(func=run_prune)


def prune(
    directory: str,
    policy: RetentionPolicy,
    *,
    dry_run: bool,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Delete what ``policy`` drops; the ``ckpt prune --json`` document.

    With ``dry_run`` nothing is written (no lock either). Otherwise the writer
    lock is taken through :class:`ckpt.CheckpointWriter` and the steps listed
    again under it before anything is deleted.

    Raises:
        CheckpointNotFoundError: ``directory`` does not exist.
        CheckpointLockedError: Another process holds the writer lock.
    """
    reader = open_reader(directory, storage_options)
    steps = reader.all_steps()
    doomed = _doomed(steps, policy)
    if doomed and not dry_run:
        steps, doomed = _delete_locked(directory, policy, storage_options)
    return {
        "directory": reader.directory,
        "dry_run": dry_run,
        "deleted": doomed,
        "kept": [s for s in steps if s not in doomed],
    }


def _doomed(steps: list[int], policy: RetentionPolicy) -> list[int]:
    return steps_to_delete(steps, just_saved=steps[-1], policy=policy) if steps else []


def _delete_locked(
    directory: str, policy: RetentionPolicy, storage_options: dict[str, Any] | None
) -> tuple[list[int], list[int]]:
    # The root exists (open_reader checked), so constructing the writer creates nothing.
    with CheckpointWriter(directory, storage_options=storage_options) as writer:
        return writer.prune(policy)


def run_prune(args: argparse.Namespace) -> int:
    """``ckpt prune``."""
    try:
        policy = RetentionPolicy(keep_last=args.keep_last, keep_every=args.keep_every)
    except ValueError as e:  # named as the user typed them
        text = str(e).replace("keep_last", "--keep-last").replace("keep_every", "--keep-every")
        raise ValueError(text) from e
    root = parse_root(args.directory, "prune")
    doc = prune(root, policy, dry_run=args.dry_run, storage_options=args.storage_options)
    if args.json:
        out(dump_json(doc))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for step in doc["deleted"]:
        out(f"{verb} step {step}")
    note(f"kept: {' '.join(map(str, doc['kept'])) or '-'}")
    return 0
