"""Names in a checkpoint root: step directories, temporary directories, tensor files, the manifest.

Pure functions over strings; one function formats each kind of name and one parses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ckpt.format.limits import MAX_STEP

MANIFEST_NAME = "manifest.json"

_STEP_DIR = re.compile(r"step_(\d{12,20})")
_TEMP_PREFIX = ".ckpt-tmp."
_TEMP_DIR = re.compile(
    r"\.ckpt-tmp\.(step_\d{12,20})\.([A-Za-z0-9-]+)-(\d{1,10})\.([0-9a-f]{1,32})"
)
_FILE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[0-9a-f]{8})?\.safetensors")
_TOKEN = re.compile(r"[0-9a-f]{8}")


def step_dir_name(step: int) -> str:
    """Return the directory name of ``step``: ``step_`` and 12 to 20 digits.

    Raises:
        ValueError: ``step`` is not an int from 0 to :data:`MAX_STEP` (``10**20 - 1``).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        shown = repr(step) if not isinstance(step, int) or abs(step) < 10**30 else "a huge int"
        raise ValueError(f"step must be an int from 0 to 10**20 - 1, got {shown}")
    return f"step_{step:012d}"


def parse_step_dir_name(name: str) -> int | None:
    """Return the step a directory name stands for, or ``None`` if it is not a step directory.

    Only the canonical spelling parses, so every step has exactly one name.
    """
    match = _STEP_DIR.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step_dir_name(step) == name else None


@dataclass(frozen=True)
class TempDirName:
    """The parts of a temporary directory name: the step and the writer that made it."""

    step: int
    host: str
    pid: int


def safe_host_name(host: str) -> str:
    """Reduce a host name to the characters allowed in a temporary directory name."""
    return re.sub(r"[^A-Za-z0-9-]", "-", host)[:64] or "host"


def temp_dir_name(step: int, host: str, pid: int, token: str) -> str:
    """Return the name of the temporary directory a save of ``step`` writes into.

    It starts with ``.ckpt-tmp.`` and therefore never parses as a step; it names
    the writer (host and pid) so that an abandoned one can be recognized.
    """
    return f"{_TEMP_PREFIX}{step_dir_name(step)}.{safe_host_name(host)}-{pid}.{token}"


def parse_temp_dir_name(name: str) -> TempDirName | None:
    """Return the parts of a name made by :func:`temp_dir_name`, or ``None`` if it is not one."""
    match = _TEMP_DIR.fullmatch(name)
    if match is None or parse_step_dir_name(match.group(1)) is None:
        return None
    return TempDirName(int(match.group(1)[5:]), match.group(2), int(match.group(3)))


def item_file_name(item: str, token: str | None = None) -> str:
    """Return the safetensors file name that holds an item's tensors.

    ``token`` (8 hex digits) makes the name unique to one save attempt; it is
    used where checkpoints are committed without a rename (object stores), so
    that two writers racing for one step never write the same object.
    """
    if token is None:
        return f"{item}.safetensors"
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"token must be 8 hex digits, got {token!r}")
    return f"{item}.{token}.safetensors"


def is_tensor_file_name(name: str) -> bool:
    """Whether ``name`` is a tensor file name ckpt writes (``<item>[.<token>].safetensors``)."""
    return _FILE_NAME.fullmatch(name) is not None
