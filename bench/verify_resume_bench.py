"""Benchmark: what ``ckpt.verify_resume`` costs against a plain run of the same steps.

Usage: python bench/verify_resume_bench.py [--width 256] [--layers 4] [--steps 20] [--save-at 9]

Runs the GPT-2-shaped loop of ``tests/resume_loops.py`` (``--width``, ``--layers``)
plainly (build and ``--steps`` steps), then ``verify_resume`` on it in this
process and in a fresh one, and prints each against the plain run, in wall time
and in CPU time (this process's and its children's, all threads: the steadier
figure on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import resume_loops

import ckpt


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), _cpu()
    result = fn()
    return time.perf_counter() - wall, _cpu() - cpu, result


def plain(steps: int) -> None:
    items = resume_loops.gpt_build()
    for i in range(steps):
        resume_loops.gpt_step(items, i)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-at", type=int, default=9)
    args = parser.parse_args()
    size = {"width": args.width, "layers": args.layers}
    resume_loops.GPT_WIDTH.update(size)
    os.environ["CKPT_BENCH_GPT"] = f"{args.width},{args.layers}"  # the child's model too
    params = sum(p.numel() for p in resume_loops.TinyGPT(**size).parameters())
    print(f"GPT-shaped model: {params / 1e6:.1f} M parameters, {args.steps} steps")
    runs = [timed(lambda: plain(args.steps)) for _ in range(2)]
    wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"plain run (build + steps): {wall:.2f} s wall, {cpu:.2f} s CPU")
    for fresh in (False, True):
        w, c, report = timed(
            lambda fresh=fresh: ckpt.verify_resume(
                resume_loops.gpt_build,
                resume_loops.gpt_step,
                steps=args.steps,
                save_at=args.save_at,
                fresh_process=fresh,
            )
        )
        assert isinstance(report, ckpt.ResumeReport)
        where = "fresh process" if fresh else "in process"
        print(
            f"verify_resume ({where}): {w:.2f} s wall = {w / wall:.2f}x, "
            f"{c:.2f} s CPU = {c / cpu:.2f}x the plain run; exact={report.exact}"
        )
        if not report.exact:
            print(report)


if __name__ == "__main__":
    main()
