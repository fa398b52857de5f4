"""``ckpt copy``: copy committed steps from one root to another, verified, committed atomically."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ckpt.cli.render import dump_json, note, out
from ckpt.cli.source import open_reader, parse_root, parse_target
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.progress import progress_bar
from ckpt.reading.reader import CheckpointReader
from ckpt.saving.copying import read_source_manifest
from ckpt.saving.writer import CheckpointWriter
from ckpt.tiers.tierset import roots_overlap

__all__ = ["add_parser", "copy"]

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ckpt copy SRC[:STEP] DST [--json]``."""
    p = subparsers.add_parser(
        "copy",
        help="copy checkpoints between roots (local <-> s3), verified",
        description="Copy the committed step STEP of SRC (every committed step when no STEP is "
        "given) into DST, oldest first. Each file's size and checksum are checked while it "
        "streams; a step is committed in DST the way a save commits there (rename on local "
        "disk, manifest last on object stores), so DST never lists a partial copy. Steps "
        "already in DST are skipped. Takes DST's writer lock (fails at once while a training "
        "run writes there). --storage-option applies to both roots. Uploads to S3 go up as "
        "parallel multipart uploads. A progress bar (bytes) shows on stderr when it is a "
        "terminal.",
    )
    p.add_argument("source", metavar="SRC[:STEP]", help="checkpoint root, and optionally a step")
    p.add_argument("destination", metavar="DST", help="checkpoint root to copy into")
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    p.set_defaults(func=run_copy)


def copy(
    source: str,
    destination: str,
    step: int | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Copy ``step`` (every committed step when ``None``) of ``source`` into ``destination``.

    With ``progress``, a bar on stderr counts the bytes copied (tqdm, or one plain line).

    Returns:
        The ``ckpt copy --json`` document: the roots, the steps copied and skipped.

    Raises:
        ValueError: ``source`` and ``destination`` are the same root, or one lies inside the
            other (links resolved).
        CheckpointNotFoundError: ``source`` or ``step`` does not exist.
        CorruptCheckpointError: A source file fails its size or checksum (nothing of
            that step is listed in ``destination``).
        CheckpointLockedError: Another process holds ``destination``'s writer lock.
        CheckpointWriteError: Writing ``destination`` failed.
    """
    if roots_overlap(source, destination):
        raise ValueError(
            f"ckpt copy: the source and destination are the same root, or one lies inside "
            f"the other ({source!r}, {destination!r}); a copy needs a root of its own"
        )
    reader = open_reader(source, storage_options)
    steps = reader.all_steps()
    if step is not None:
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} (committed: {steps})",
                path=reader.directory,
            )
        steps = [step]
    copied: list[int] = []
    with CheckpointWriter(destination, storage_options=storage_options) as writer:
        todo = [s for s in steps if not writer.is_committed(s)]
        skipped = [s for s in steps if s not in todo]
        for s in skipped:
            _warn_if_different(reader, writer, s)
        total = sum(_step_bytes(reader, s) for s in todo) if progress else None
        with progress_bar(
            total, "copy", enabled=progress, unit="B", unit_scale=True, line=True
        ) as bar:
            for s in todo:
                bar.describe(f"step {s}")
                writer.commit_copy(reader.steps.storage, s, progress=bar.update)
                copied.append(s)
    return {
        "source": reader.directory,
        "destination": writer.directory,
        "copied": copied,
        "skipped": skipped,
    }


def _warn_if_different(reader: CheckpointReader, writer: CheckpointWriter, step: int) -> None:
    """Warn when ``step``, skipped as already in the destination, is another checkpoint there."""
    try:
        theirs = read_source_manifest(writer.storage, step)[0]
        ours = read_source_manifest(reader.steps.storage, step)[0]
    except CheckpointError:
        return  # not ours to judge here: `ckpt verify` tells
    if theirs != ours:
        logger.warning(
            "step %d in %s is not the same checkpoint as in %s (its manifest differs); "
            "it is kept, not replaced",
            step,
            writer.directory,
            reader.directory,
        )


def _step_bytes(reader: CheckpointReader, step: int) -> int:
    """The bytes of ``step``'s files (0 when its manifest cannot be read: the copy tells why)."""
    try:
        found = reader.manifest(step)
    except CheckpointError:
        return 0
    return 0 if found is None else sum(r.size for r in found[1].files.values())


def run_copy(args: argparse.Namespace) -> int:
    """``ckpt copy``."""
    target = parse_target(args.source)
    destination = parse_root(args.destination, "copy")
    doc = copy(
        target.root,
        destination,
        target.step,
        storage_options=args.storage_options,
        progress=args.progress,
    )
    if args.json:
        out(dump_json(doc))
        return 0
    for step in doc["copied"]:
        out(f"copied step {step}")
    if doc["skipped"]:
        note(f"already in {doc['destination']}: {' '.join(map(str, doc['skipped']))}")
    return 0
