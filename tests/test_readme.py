"""README keeps exactly two set-up commands, and CI runs the test one verbatim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:sh|bash)\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    demo, tests = setup_commands()
    assert "examples/train_resume.py" in demo and "pip install" in demo
    assert "pytest" in tests and "pip install" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


ALARMING = re.compile(r"warning|error|failed|traceback|deprecat", re.I)


def assert_example_ends_identical(script: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IDENTICAL" in done.stdout
    output = done.stdout + done.stderr  # nothing a newcomer would take for an error
    assert not ALARMING.search(output), output


def test_demo_resumes_bit_identically():
    assert_example_ends_identical("train_resume.py", "--seed", "3")


@pytest.mark.s3
def test_s3_example_resumes_bit_identically():
    assert_example_ends_identical("s3_resume.py")
