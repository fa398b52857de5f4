"""``ckpt diff A B``: tensor by tensor and value by value, one tensor of each side at a time.

Shapes, dtypes and which tensors exist come from the two manifests; only
tensors present on both sides with one shape and dtype are read, each item's
tensors from both checkpoints in lockstep. Checkpoints of the same model store
their tensors in the same order, so memory stays at one tensor per side (plus
float64 chunks of :data:`~ckpt.cli.compare.CHUNK_ELEMENTS`); a tensor that
arrives before its partner is held until the partner does.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ckpt.cli.compare import tensor_difference, value_changes
from ckpt.cli.render import dump_json, out, short_value, table
from ckpt.cli.source import no_checkpoint, open_reader, parse_target
from ckpt.progress import ProgressBar, progress_bar

__all__ = ["SMALL_ITEM_BYTES", "STATUSES", "add_parser", "diff_doc"]

logger = logging.getLogger(__name__)

STATUSES = ("equal", "changed", "added", "removed", "shape_changed", "dtype_changed")
"""The status of a tensor in ``ckpt diff`` output."""

SMALL_ITEM_BYTES = 16 << 20
"""Items other than modules and optimizers holding at most this many tensor bytes are read
whole, so their non-tensor values (a scheduler's counters, say) are compared too."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ckpt diff A B [--atol X] [--json]``."""
    p = subparsers.add_parser(
        "diff",
        help="compare two checkpoints tensor by tensor",
        description="Compare the checkpoints A and B (each DIR[:STEP], the latest without "
        "STEP): every tensor equal / changed (max abs and relative difference) / added / "
        "removed / shape or dtype changed, and every changed non-tensor value (epoch, "
        "metrics, optimizer hyperparameters, small items' values). Exit status 1 when "
        "they differ.",
    )
    p.add_argument("a", metavar="A", help="DIR[:STEP]")
    p.add_argument("b", metavar="B", help="DIR[:STEP]")
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        metavar="X",
        help="count tensors whose max absolute difference is at most X as equal "
        "(default: only bit-identical tensors are equal)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    p.set_defaults(func=run_diff)


class _Side:
    """One checkpoint being compared: its reader, step and description."""

    def __init__(self, text: str, storage_options: dict[str, Any] | None) -> None:
        target = parse_target(text)
        self.reader = open_reader(target.root, storage_options)
        if target.step is None and self.reader.latest_step() is None:
            raise no_checkpoint(self.reader.directory)
        self.doc: dict[str, Any] = self.reader.describe(target.step).to_json()
        self.step: int = self.doc["step"]
        self.items: dict[str, dict[str, Any]] = {i["name"]: i for i in self.doc["items"]}

    def tensors(self, item: str) -> Iterator[tuple[str, torch.Tensor]]:
        it: Iterator[tuple[str, torch.Tensor]] = self.reader.iter_tensors(
            self.step, item=item, verify=True
        )
        return it

    def where(self) -> dict[str, Any]:
        return {"directory": self.reader.directory, "step": self.step}


def _record(
    item: str, key: str, status: str, a: dict[str, Any] | None, b: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "item": item,
        "key": key,
        "status": status,
        "dtype_a": None if a is None else a["dtype"],
        "dtype_b": None if b is None else b["dtype"],
        "shape_a": None if a is None else list(a["shape"]),
        "shape_b": None if b is None else list(b["shape"]),
        "max_abs": None,
        "max_rel": None,
    }


def _plan_item(
    name: str, a: dict[str, Any] | None, b: dict[str, Any] | None
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Records for every tensor of one item, and those whose data must be compared."""
    ta = {t["key"]: t for t in (a or {}).get("tensors", [])}
    tb = {t["key"]: t for t in (b or {}).get("tensors", [])}
    records: dict[str, dict[str, Any]] = {}
    to_read: dict[str, dict[str, Any]] = {}
    for key in list(ta) + [k for k in tb if k not in ta]:
        ma, mb = ta.get(key), tb.get(key)
        if mb is None:
            records[key] = _record(name, key, "removed", ma, None)
        elif ma is None:
            records[key] = _record(name, key, "added", None, mb)
        elif list(ma["shape"]) != list(mb["shape"]):
            records[key] = _record(name, key, "shape_changed", ma, mb)
        elif ma["dtype"] != mb["dtype"]:
            records[key] = _record(name, key, "dtype_changed", ma, mb)
        else:
            records[key] = to_read[key] = _record(name, key, "equal", ma, mb)
    return records, to_read


def _compare_item(
    name: str,
    sa: _Side,
    sb: _Side,
    to_read: dict[str, dict[str, Any]],
    atol: float | None,
    bar: ProgressBar,
) -> None:
    """Stream both sides' tensors of one item, filling in ``to_read``'s records."""
    pending: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    streams = [sa.tensors(name), sb.tensors(name)]
    live = [True, True]
    while any(live):
        for side in (0, 1):
            if not live[side]:
                continue
            got = next(streams[side], None)
            if got is None:
                live[side] = False
                continue
            key, tensor = got
            if key not in to_read:
                continue
            other = pending[1 - side].pop(key, None)
            if other is None:
                pending[side][key] = tensor
                continue
            a, b = (tensor, other) if side == 0 else (other, tensor)
            _fill(to_read[key], a, b, atol)
            bar.describe(f"{name}/{key}")
            bar.update()
            del a, b, other, tensor
    unread = [k for k, r in to_read.items() if r["max_abs"] is None]
    if unread:
        logger.warning("item %r: tensors listed but not read on both sides: %s", name, unread)


def _fill(record: dict[str, Any], a: torch.Tensor, b: torch.Tensor, atol: float | None) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:  # the manifest disagreed with the data
        record["status"] = "shape_changed" if a.shape != b.shape else "dtype_changed"
        return
    identical, max_abs, max_rel = tensor_difference(a, b)
    record["max_abs"], record["max_rel"] = max_abs, max_rel
    equal = identical or (atol is not None and max_abs <= atol)
    record["status"] = "equal" if equal else "changed"


def _item_values(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": item["kind"],
        "optimizer_class": item.get("optimizer_class"),
        "param_groups": item.get("param_groups"),
        "param_names": item.get("param_names"),
    }


def _plain(value: Any) -> Any:
    """A state's non-tensor leaves as JSON-like values (tensors dropped)."""
    if isinstance(value, torch.Tensor):
        return "<tensor>"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _small_items(side: _Side, names: list[str]) -> dict[str, Any]:
    wanted = [
        n
        for n in names
        if side.items[n]["kind"] not in ("module", "optimizer", "rng")
        and side.items[n]["nbytes"] <= SMALL_ITEM_BYTES
    ]
    if not wanted:
        return {}
    state = side.reader.read(side.step, items=wanted)
    return {n: _plain(state[n]) for n in wanted}


def _values(sa: _Side, sb: _Side) -> list[dict[str, Any]]:
    a, b = sa.doc, sb.doc
    tree_a: dict[str, Any] = {"epoch": a["epoch"], "metrics": a["metrics"], "items": {}}
    tree_b: dict[str, Any] = {"epoch": b["epoch"], "metrics": b["metrics"], "items": {}}
    common = [n for n in sa.items if n in sb.items]
    for n in common:
        tree_a["items"][n] = _item_values(sa.items[n])
        tree_b["items"][n] = _item_values(sb.items[n])
    for n, state in _small_items(sa, common).items():
        tree_a["items"][n]["state"] = state
    for n, state in _small_items(sb, common).items():
        tree_b["items"][n]["state"] = state
    return value_changes(tree_a, tree_b)


def diff_doc(
    a: str,
    b: str,
    *,
    atol: float | None,
    progress: bool,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``ckpt diff --json`` document comparing ``DIR[:STEP]`` ``a`` with ``b``."""
    if atol is not None and not atol >= 0:
        raise ValueError(f"--atol must be a number >= 0, got {atol}")
    sa, sb = _Side(a, storage_options), _Side(b, storage_options)
    names = list(sa.items) + [n for n in sb.items if n not in sa.items]
    plans = {n: _plan_item(n, sa.items.get(n), sb.items.get(n)) for n in names}
    total = sum(len(to_read) for _, to_read in plans.values())
    with progress_bar(total, "diff", enabled=progress, unit="tensor") as bar:
        for n, (_, to_read) in plans.items():
            if to_read:
                _compare_item(n, sa, sb, to_read, atol, bar)
    tensors = [r for records, _ in plans.values() for r in records.values()]
    values = _values(sa, sb)
    summary = {s: sum(1 for r in tensors if r["status"] == s) for s in STATUSES}
    return {
        "a": sa.where(),
        "b": sb.where(),
        "atol": atol,
        "equal": summary["equal"] == len(tensors) and not values,
        "summary": summary,
        "tensors": tensors,
        "values": values,
    }


def _detail(r: dict[str, Any]) -> str:
    shape_a = "(" + ", ".join(map(str, r["shape_a"] or ())) + ")"
    shape_b = "(" + ", ".join(map(str, r["shape_b"] or ())) + ")"
    status = r["status"]
    if status in ("changed", "equal"):
        return f"max abs {r['max_abs']:.4g}  max rel {r['max_rel']:.4g}"
    if status == "added":
        return f"{r['dtype_b']} {shape_b}"
    if status == "removed":
        return f"{r['dtype_a']} {shape_a}"
    if status == "shape_changed":
        return f"{shape_a} -> {shape_b}"
    return f"{r['dtype_a']} -> {r['dtype_b']}"


def render_diff(doc: dict[str, Any]) -> str:
    """The text ``ckpt diff`` prints: what differs, then a summary line."""
    lines = [
        f"--- a: {doc['a']['directory']} step {doc['a']['step']}",
        f"+++ b: {doc['b']['directory']} step {doc['b']['step']}",
    ]
    rows = [
        [r["status"].replace("_", " "), f"{r['item']}/{r['key']}", _detail(r)]
        for r in doc["tensors"]
        if r["status"] != "equal"
    ]
    rows += [
        ["value", v["path"], f"{short_value(v['a'])} -> {short_value(v['b'])}"]
        for v in doc["values"]
    ]
    if rows:
        lines.append(table(["STATUS", "NAME", "DETAIL"], rows))
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in doc["summary"].items() if n)
    verdict = "identical" if doc["equal"] else "different"
    lines.append(f"{verdict}: {counts or 'no tensors'}; {len(doc['values'])} value(s) changed")
    return "\n".join(lines)


def run_diff(args: argparse.Namespace) -> int:
    """``ckpt diff``."""
    doc = diff_doc(
        args.a,
        args.b,
        atol=args.atol,
        progress=args.progress,
        storage_options=args.storage_options,
    )
    out(dump_json(doc) if args.json else render_diff(doc))
    return 0 if doc["equal"] else 1
