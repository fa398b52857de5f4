"""Benchmark: what ``ckpt.verify_resume`` costs against a plain run of the same steps.

Usage: python bench/verify_resume_bench.py [--width 256] [--layers 4] [--steps 20] [--save-at 9]

Runs the GPT-2-shaped loop of ``tests/resume_loops.py`` (``--width``, ``--layers``)
once plainly (build and ``--steps`` steps, timed), then ``verify_resume`` on it in
this process and in a fresh one, and prints each total against the plain run
(wall and this process's CPU time; the child's CPU time is not in the latter).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import resume_loops

import ckpt


def plain(steps: int) -> float:
    began = time.perf_counter()
    items = resume_loops.gpt_build()
    for i in range(steps):
        resume_loops.gpt_step(items, i)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-at", type=int, default=9)
    args = parser.parse_args()
    resume_loops.GPT_WIDTH.update(width=args.width, layers=args.layers)
    params = sum(p.numel() for p in resume_loops.TinyGPT(**resume_loops.GPT_WIDTH).parameters())
    print(f"GPT-shaped model: {params / 1e6:.1f} M parameters, {args.steps} steps")
    base = min(plain(args.steps) for _ in range(2))
    print(f"plain run (build + steps): {base:.2f} s")
    for fresh in (False, True):
        if fresh:  # the child builds with the module's defaults: pass the size through its env
            os.environ["CKPT_BENCH_GPT"] = f"{args.width},{args.layers}"
        began = time.perf_counter()
        report = ckpt.verify_resume(
            resume_loops.gpt_build,
            resume_loops.gpt_step,
            steps=args.steps,
            save_at=args.save_at,
            fresh_process=fresh,
        )
        total = time.perf_counter() - began
        where = "fresh process" if fresh else "in process"
        print(
            f"verify_resume ({where}): {total:.2f} s = {total / base:.2f}x the plain run; "
            f"exact={report.exact} (its plain steps: {report.seconds['plain']:.2f} s)"
        )
        if not report.exact:
            print(report)


if __name__ == "__main__":
    main()
