"""The ``ckpt export`` and ``ckpt import`` commands (registered by :func:`ckpt.cli.main`).

Exit codes: 0 done, 1 a checkpoint problem (missing, corrupt, refused), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ckpt.cli.source import parse_target
from ckpt.convert.export import DTYPES, FORMATS, export, parse_size
from ckpt.convert.importing import FORMATS as IMPORT_FORMATS
from ckpt.convert.importing import import_checkpoint
from ckpt.errors import CheckpointError
from ckpt.format.limits import MAX_STEP

__all__ = ["add_export_parser", "add_import_parser", "split_step"]

logger = logging.getLogger(__name__)


def split_step(spec: str) -> tuple[str, int | None]:
    """``DIR[:STEP]`` -> (DIR, STEP), read as every command reads it (``parse_target``)."""
    target = parse_target(spec)
    return target.root, target.step


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export DIR[:STEP] OUT`` to ``subparsers`` (its ``func`` returns the exit code)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="write a module item's weights as Hugging Face safetensors (or a torch.save file)",
        description="Write a module item's weights as Hugging Face safetensors: "
        "model.safetensors, or shards plus model.safetensors.index.json.",
    )
    p.add_argument(
        "source", metavar="DIR[:STEP]", help="checkpoint root, optionally :STEP (default: latest)"
    )
    p.add_argument(
        "out",
        metavar="OUT",
        help="output directory (local; not inside DIR nor any checkpoint root)",
    )
    p.add_argument("--item", default="model", help="the module item (default: model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point tensors")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="data bytes per safetensors file, like 5GB or 500MiB (default 5GB)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="safetensors",
        help="safetensors (Hub layout, streamed) or pt (pytorch_model.bin); default safetensors",
    )
    p.add_argument(
        "--keep-prefixes",
        action="store_true",
        help="keep _orig_mod. (torch.compile) and module. (DataParallel) in the names",
    )
    p.add_argument("--json", action="store_true", help="print the files written as JSON")
    p.set_defaults(func=_run_export)
    return p


def add_import_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``import SRC DIR`` to ``subparsers`` (its ``func`` returns the exit code)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "import",
        help="convert a torch.save / Lightning / HF Trainer / Accelerate / DCP checkpoint",
        description="Convert another tool's checkpoint into a ckpt checkpoint; torch.save "
        "files are loaded with weights_only=True only.",
    )
    p.add_argument("src", metavar="SRC", help="a .pt/.ckpt/.safetensors file or a directory")
    p.add_argument("directory", metavar="DIR", help="the ckpt root to write")
    p.add_argument("--step", type=int, help="the step to write (default: the source's)")
    p.add_argument(
        "--format",
        choices=IMPORT_FORMATS,
        default="auto",
        help="what SRC is (default auto: told from its name and contents)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_import)
    return p


def _progress(args: argparse.Namespace) -> bool:
    explicit = getattr(args, "progress", None)
    if isinstance(explicit, bool):
        return explicit
    return sys.stderr.isatty()


def _run_export(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.source)
        parse_size(args.max_shard_size)
    except ValueError:
        sys.stderr.write(
            f"ckpt export: error: --max-shard-size {args.max_shard_size!r} is not a size "
            "like 5GB or 500MiB\n"
        )
        return 2
    try:
        written = export(
            target.root,
            args.out,
            step=target.step,
            item=args.item,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            format=args.format,
            progress=_progress(args),
            storage_options=getattr(args, "storage_options", None),
            strip_prefixes=not args.keep_prefixes,
        )
    except CheckpointError as e:
        sys.stderr.write(f"ckpt export: {e}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps({"files": written}) + "\n")
    else:
        sys.stdout.write("".join(path + "\n" for path in written))
    return 0


def _run_import(args: argparse.Namespace) -> int:
    if args.step is not None and not 0 <= args.step <= MAX_STEP:
        sys.stderr.write(f"ckpt import: error: --step must be in [0, {MAX_STEP}]\n")
        return 2
    try:
        report = import_checkpoint(
            args.src,
            args.directory,
            step=args.step,
            format=args.format,
            storage_options=getattr(args, "storage_options", None),
        )
    except CheckpointError as e:
        sys.stderr.write(f"ckpt import: {e}\n")
        return 1
    except ValueError as e:
        sys.stderr.write(f"ckpt import: error: {e}\n")
        return 2
    if args.json:
        sys.stdout.write(
            json.dumps(
                {
                    "source": report.source,
                    "layout": report.layout,
                    "directory": report.directory,
                    "step": report.step,
                    "epoch": report.epoch,
                    "items": report.items,
                    "mapped": report.mapped,
                    "extra": list(report.extra),
                    "dropped": report.dropped,
                    "notes": list(report.notes),
                }
            )
            + "\n"
        )
    else:
        sys.stdout.write(report.summary() + "\n")
    return 0
