"""``ckpt ls`` (the committed steps of a root) and ``ckpt info`` (one checkpoint's contents).

Both read manifests only, never tensor data, through a
:class:`~ckpt.reading.manifests.ManifestReader`: neither imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
from typing import Any

from ckpt.cli.render import dump_json, human_bytes, note, out, short_value, table
from ckpt.cli.source import no_checkpoint, open_manifests, parse_root, parse_target
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.gc_pause import paused_gc

__all__ = ["add_info_parser", "add_ls_parser", "info_doc", "ls_doc"]


def add_ls_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ckpt ls DIR [--json]``."""
    p = subparsers.add_parser(
        "ls",
        help="list the committed checkpoints of a directory",
        description="List the committed steps of DIR with time, size, epoch, metrics and items.",
    )
    p.add_argument(
        "directory",
        metavar="DIR",
        help="checkpoint root: a path or fsspec URL",
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    p.set_defaults(func=run_ls)


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ckpt info DIR[:STEP] [--tensors PATTERN] [--json]``."""
    p = subparsers.add_parser(
        "info",
        help="describe one checkpoint (items, tensors, optimizer, metrics)",
        description="Describe the checkpoint at DIR[:STEP] (the latest without STEP) "
        "from its manifest, without reading tensor data.",
    )
    p.add_argument("target", metavar="DIR[:STEP]", help="checkpoint root, optionally :STEP")
    p.add_argument(
        "--tensors",
        metavar="PATTERN",
        help="only tensors whose 'item/key' or key matches this glob (e.g. 'model/*.weight')",
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    p.set_defaults(func=run_info)


# --------------------------------------------------------------------------- ls


def _ls_row(reader: Any, step: int) -> dict[str, Any]:
    """One ``ls`` row; a step whose manifest cannot be read is a row with ``damaged`` set."""
    try:
        description = reader.describe(step)
    except CheckpointError as e:
        return {
            "step": step,
            "created_at": None,
            "nbytes": None,
            "epoch": None,
            "metrics": {},
            "items": [],
            "format_version": None,
            "world_size": None,
            "damaged": str(e),
        }
    d = dataclasses.replace(description, items=()).to_json()  # not every tensor as JSON
    return {
        "step": d["step"],
        "created_at": d["created_at"],
        "nbytes": d["nbytes"],
        "epoch": d["epoch"],
        "metrics": d["metrics"],
        "items": [item.name for item in description.items],
        "format_version": d["format_version"],
        "world_size": d["world_size"],
        "damaged": None,
    }


def ls_doc(reader: Any) -> dict[str, Any]:
    """The ``ckpt ls --json`` document of an open reader: every step, damaged ones marked."""
    rows = [_ls_row(reader, step) for step in reader.all_steps()]
    return {"directory": reader.directory, "checkpoints": rows}


@paused_gc()  # tens of thousands of short-lived JSON nodes: see ckpt.gc_pause
def run_ls(args: argparse.Namespace) -> int:
    """``ckpt ls``: exit 1 (after listing every step) when a step is damaged."""
    reader = open_manifests(parse_root(args.directory, "ls"), args.storage_options)
    doc = ls_doc(reader)
    damaged = [c for c in doc["checkpoints"] if c["damaged"]]
    if args.json:
        out(dump_json(doc))
    elif not doc["checkpoints"]:
        reason = no_checkpoint(doc["directory"]).reason.removeprefix("no committed checkpoint")
        note(f"ckpt: no committed checkpoints in {doc['directory']}{reason}")
    else:
        rows = [
            [
                str(c["step"]),
                c["created_at"] or "DAMAGED",
                "-" if c["nbytes"] is None else human_bytes(c["nbytes"]),
                "-" if c["epoch"] is None else str(c["epoch"]),
                " ".join(f"{k}={short_value(v)}" for k, v in c["metrics"].items()) or "-",
                ",".join(c["items"]) or "-",
            ]
            for c in doc["checkpoints"]
        ]
        out(table(["STEP", "CREATED", "SIZE", "EPOCH", "METRICS", "ITEMS"], rows, right=(0, 2, 3)))
    for c in damaged:
        note(f"ckpt: step {c['step']} is damaged: {c['damaged']}")
    return 1 if damaged else 0


# ------------------------------------------------------------------------- info


def _matches(pattern: str | None, item: str, key: str) -> bool:
    if pattern is None:
        return True
    return fnmatch.fnmatchcase(f"{item}/{key}", pattern) or fnmatch.fnmatchcase(key, pattern)


def info_doc(reader: Any, step: int | None, pattern: str | None) -> dict[str, Any]:
    """The ``ckpt info --json`` document: the description, tensors filtered by ``pattern``."""
    if step is None and reader.latest_step() is None:
        raise no_checkpoint(reader.directory)
    doc = dict(reader.describe(step).to_json())
    doc["directory"] = reader.directory
    doc.update(_sharing(reader, doc))
    if pattern is not None:
        doc["items"] = [
            {
                **item,
                "tensors": [
                    t for t in item["tensors"] if _matches(pattern, item["name"], t["key"])
                ],
            }
            for item in doc["items"]
        ]
    return doc


def _sharing(reader: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """Bytes the step shares with other steps and bytes only it holds (incremental roots).

    Reads the other steps' manifests only for a version 4 step; a step deleted
    meanwhile shares nothing, one whose manifest cannot be read is listed in
    ``sharing_unknown`` (its blobs count as this step's own).
    """
    from ckpt.reading.sharing import describe_sharing  # noqa: PLC0415 - CLI imports stay lazy

    unknown: list[int] = []
    if doc["format_version"] != 4:
        figures = {"shared_nbytes": 0, "own_nbytes": doc["nbytes"], "shared_with": []}
        return {**figures, "sharing_unknown": unknown}
    found = reader.manifest(doc["step"])  # raises if the step was deleted meanwhile
    if found is None:
        raise no_checkpoint(reader.directory)
    others = []
    for step in reader.all_steps():
        if step == doc["step"]:
            continue
        try:
            other = reader.manifest(step)
        except CheckpointNotFoundError:
            continue
        except CheckpointError:
            unknown.append(step)
            continue
        if other is not None:
            others.append(other[1])
    return {**describe_sharing(found[1], others).to_json(), "sharing_unknown": unknown}


def _header(doc: dict[str, Any]) -> list[str]:
    files = doc["files"]
    lines = [
        f"directory:  {doc['directory']}",
        f"step:       {doc['step']}",
        f"epoch:      {'-' if doc['epoch'] is None else doc['epoch']}",
        f"created:    {doc['created_at']}",
        f"format:     {doc['format_version']} (world size {doc['world_size']})",
        f"size:       {human_bytes(doc['nbytes'])} in {len(files)} file(s)",
    ]
    if doc["format_version"] == 4:
        with_ = ",".join(str(s) for s in doc["shared_with"]) or "-"
        lines.append(
            f"shared:     {human_bytes(doc['shared_nbytes'])} with step(s) {with_}; "
            f"own: {human_bytes(doc['own_nbytes'])}"
        )
        if doc["sharing_unknown"]:
            lines.append(f"            (unreadable steps not counted: {doc['sharing_unknown']})")
    if doc["metrics"]:
        lines.append(
            "metrics:    " + " ".join(f"{k}={short_value(v)}" for k, v in doc["metrics"].items())
        )
    if doc["versions"]:
        lines.append("versions:   " + " ".join(f"{k}={v}" for k, v in doc["versions"].items()))
    return lines


_GLOBAL_KINDS = ("module", "optimizer")
"""Kinds saved once for all the ranks of a group; every other item each rank saves itself."""


def _item_lines(item: dict[str, Any], world_size: int) -> list[str]:
    count = len(item["tensors"])
    lines = [f"item {item['name']!r} ({item['kind']}, {human_bytes(item['nbytes'])})"]
    if world_size > 1 and item["kind"] not in _GLOBAL_KINDS:
        lines.append(f"  rank 0's: each of the {world_size} ranks saved its own")
    if item.get("optimizer_class"):
        lines.append(f"  optimizer: {item['optimizer_class']}")
    for i, group in enumerate(item.get("param_groups") or ()):
        lines.append(f"  group {i}: " + " ".join(f"{k}={short_value(v)}" for k, v in group.items()))
    names = item.get("param_names")
    if names:
        shown = ", ".join("?" if n is None else str(n) for n in names[:8])
        more = f", ... ({len(names)} in all)" if len(names) > 8 else ""
        lines.append(f"  parameters: {shown}{more}")
    if count:
        shapes: dict[tuple[int, ...], str] = {}  # a model repeats a few shapes and sizes
        sizes: dict[int, str] = {}
        rows = []
        for t in item["tensors"]:
            shape, nbytes = tuple(t["shape"]), t["nbytes"]
            if shape not in shapes:
                shapes[shape] = "(" + ", ".join([str(n) for n in shape]) + ")"
            if nbytes not in sizes:
                sizes[nbytes] = human_bytes(nbytes)
            rows.append(
                [t["key"], t["dtype"], shapes[shape], sizes[nbytes], str(t.get("shards", 1))]
            )
        body = table(["KEY", "DTYPE", "SHAPE", "SIZE", "SHARDS"], rows, right=(3, 4))
        lines.extend("  " + line for line in body.splitlines())
    return lines


@paused_gc()
def run_info(args: argparse.Namespace) -> int:
    """``ckpt info``."""
    target = parse_target(args.target)
    reader = open_manifests(target.root, args.storage_options)
    doc = info_doc(reader, target.step, args.tensors)
    if args.json:
        out(dump_json(doc))
        return 0
    lines = _header(doc)
    for item in doc["items"]:
        lines.append("")
        lines.extend(_item_lines(item, doc["world_size"]))
    out("\n".join(lines))
    return 0
