"""``ckpt verify-resume``: prove that a training loop resumes exactly (``ckpt.verify_resume``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ckpt.cli.render import dump_json, note, out
from ckpt.errors import CheckpointError

EXIT_USAGE = 2  # as ckpt.cli's

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ckpt verify-resume MODULE:BUILD MODULE:STEP --steps N --save-at K [--json]``."""
    p = subparsers.add_parser(
        "verify-resume",
        help="check that a training loop resumed from a checkpoint continues bit for bit",
        description="Run the loop BUILD/STEP uninterrupted twice, and once saved after step "
        "K and resumed in a fresh process, and compare every tensor, random stream and "
        "loss bit for bit (ckpt.verify_resume). Modules are imported with the current "
        "directory on the path. Exit status 0 exact, 1 not exact, 2 a usage error (or the "
        "loop raised: the message names the run and step).",
    )
    p.add_argument("build", metavar="MODULE:BUILD", help="returns the dict of fresh items")
    p.add_argument("step", metavar="MODULE:STEP", help="step(items, i) runs step i")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="steps in each run")
    p.add_argument(
        "--save-at", dest="save_at", type=int, required=True, metavar="K", help="save after step K"
    )
    p.add_argument(
        "--in-process",
        dest="in_process",
        action="store_true",
        help="resume in this process instead of a fresh one",
    )
    p.add_argument(
        "--async-save", dest="async_save", action="store_true", help="save with async_save=True"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill the resumed run in a fresh process after SECONDS (exit 2)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/cli.md)")
    p.set_defaults(func=run_verify_resume)


def run_verify_resume(args: argparse.Namespace) -> int:
    """Run ``ckpt verify-resume``; 0 exact, 1 not exact, 2 a usage error or a loop that raised."""
    from ckpt.verification import verify_resume  # noqa: PLC0415 - only this command needs it
    from ckpt.verification.runs import resolve  # noqa: PLC0415

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        resolve(args.build), resolve(args.step)
    except (ValueError, TypeError, ImportError) as e:
        note(f"ckpt verify-resume: error: {e}")
        return EXIT_USAGE
    try:
        report = verify_resume(
            args.build,
            args.step,
            steps=args.steps,
            save_at=args.save_at,
            fresh_process=not args.in_process,
            manager_options={"async_save": True} if args.async_save else None,
            timeout=args.timeout,
        )
    except CheckpointError:
        raise
    except Exception as e:  # the user's build() or step() failed, or returned the wrong thing
        logging.getLogger(__name__).info("verify-resume failed", exc_info=True)
        lines = [f"{type(e).__name__}: {e}", *getattr(e, "__notes__", ())]
        note("ckpt verify-resume: error: " + "\n".join(lines) + "\n(-v shows the traceback)")
        return EXIT_USAGE
    out(dump_json(report.to_json()) if args.json else str(report))
    return 0 if report.exact else 1
