"""The process's random number streams: captured for a checkpoint, checked, restored.

Covered: Python's ``random`` module, NumPy's global generator (``np.random.*``,
when NumPy has been imported), torch's CPU generator and the default generator
of every CUDA device this process initialized. Byte states are uint8 tensors;
everything else is plain typed JSON, so no pickle is involved.

Generators that user code owns (a ``torch.Generator``, ``np.random.default_rng()``)
are not global and are not captured here: save them as items of their own.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ckpt.errors import CorruptCheckpointError, IncompatibleCheckpointError

__all__ = [
    "RNG_ITEM",
    "RandomStreams",
    "capture_rng_state",
    "check_rng_state",
    "check_rng_values",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

RNG_ITEM = "rng"
"""The item name the random streams are saved under."""

_MT_WORDS = 624  # Mersenne Twister state words (Python and NumPy)


def _process_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torch.distributed``."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def capture_rng_state() -> dict[str, Any]:
    """Return the state of this process's global random streams.

    CUDA generators are included only when this process has initialized CUDA
    (before that they have never been used); capturing them creates no context.
    """
    rank, world_size = _process_rank()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "rank": rank,
        "world_size": world_size,
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        legacy = numpy.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": legacy["bit_generator"],
            "key": [int(k) for k in legacy["state"]["key"]],
            "pos": int(legacy["state"]["pos"]),
            "has_gauss": int(legacy["has_gauss"]),
            "gauss": float(legacy["gauss"]),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = [g.get_state() for g in torch.cuda.default_generators]
    return state


def _fail(key: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"random state {problem}", key=f"{RNG_ITEM}.{key}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_words(key: str, words: object, count: int) -> None:
    if not isinstance(words, list) or len(words) != count:
        raise _fail(key, f"must be a list of {count} ints")
    if not all(_is_int(w) and 0 <= w < 2**32 for w in words):
        raise _fail(key, "must hold unsigned 32-bit ints")


def _check_bytes(key: str, value: object) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise _fail(key, "must be a 1-d uint8 tensor")


def check_rng_state(state: object, *, live: bool = True) -> None:
    """Check a saved random state completely, so that restoring it cannot fail half-way.

    Tensors may be placeholders on the ``meta`` device: only dtypes and shapes are checked.
    With ``live`` false (``verify()``), only the structure is checked, not this
    process's rank and torch.

    Raises:
        CorruptCheckpointError: The state is malformed (the key names the part).
        IncompatibleCheckpointError: It was saved by another rank, or by a torch
            whose CPU generator has another state size.
    """
    if not isinstance(state, dict):
        raise _fail("", "must be a dict")
    if not _is_int(state.get("world_size")) or state["world_size"] < 1:
        raise _fail("world_size", "must be a positive int")
    if not _is_int(state.get("rank")) or not 0 <= state["rank"] < state["world_size"]:
        raise _fail("rank", f"must be an int in [0, world_size={state['world_size']})")
    if not live:
        _check_streams(state)
        _check_plain_values(state)
        return
    rank = _process_rank()[0]
    if state["rank"] != rank:
        raise IncompatibleCheckpointError(
            f"the random state was saved by rank {state['rank']} but this is rank {rank}; "
            "each rank restores its own streams (pass rng=False to skip them)",
            key=f"{RNG_ITEM}.rank",
        )
    _check_streams(state)
    _check_plain_values(state)
    live_size = torch.get_rng_state().numel()
    if state["torch"].numel() != live_size:
        raise IncompatibleCheckpointError(
            f"the torch CPU generator state has {state['torch'].numel()} bytes; "
            f"this torch uses {live_size} (pass rng=False to skip the random state)",
            key=f"{RNG_ITEM}.torch",
        )


def _check_streams(state: dict[str, Any]) -> None:
    """Check each stream's saved state (types, sizes, ranges)."""
    unknown = sorted(
        map(str, set(state) - {"rank", "world_size", "python", "torch", "numpy", "cuda"})
    )
    if unknown:
        raise _fail("", f"has unknown keys {unknown}")
    python = state.get("python")
    if not isinstance(python, dict) or not _is_int(python.get("version")):
        raise _fail("python", "must be a dict with an int version")
    _check_words("python.internal", python.get("internal"), _MT_WORDS + 1)
    if python["internal"][-1] > _MT_WORDS:
        raise _fail("python.internal", f"has a position above {_MT_WORDS}")
    if python.get("gauss_next") is not None and not isinstance(python["gauss_next"], float):
        raise _fail("python.gauss_next", "must be a float or None")

    _check_bytes("torch", state.get("torch"))

    numpy = state.get("numpy")
    if numpy is not None:
        if not isinstance(numpy, dict) or numpy.get("bit_generator") != "MT19937":
            raise _fail("numpy", "must be a dict for the MT19937 bit generator")
        _check_words("numpy.key", numpy.get("key"), _MT_WORDS)
        if not _is_int(numpy.get("pos")) or not 0 <= numpy["pos"] <= _MT_WORDS:
            raise _fail("numpy.pos", f"must be an int in [0, {_MT_WORDS}]")
        if not _is_int(numpy.get("has_gauss")) or not isinstance(numpy.get("gauss"), float):
            raise _fail("numpy", "must have an int has_gauss and a float gauss")

    cuda = state.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, list):
            raise _fail("cuda", "must be a list of per-device states")
        for index, device_state in enumerate(cuda):
            _check_bytes(f"cuda.#{index}", device_state)


def _check_plain_values(state: Mapping[str, Any]) -> None:
    """Dry-run the states that need no tensor data (Python's and NumPy's) on scratch generators.

    Run by :func:`check_rng_state`, so ``verify()`` refuses what restore would refuse.
    """
    python = state["python"]
    try:
        random.Random().setstate(
            (python["version"], tuple(python["internal"]), python["gauss_next"])
        )
    except (ValueError, TypeError, OverflowError) as e:
        raise _fail("python", f"is refused by Python: {e}") from e
    numpy_state = state.get("numpy")
    if numpy_state is None:
        return
    try:
        import numpy  # noqa: PLC0415 - optional, imported only when a state needs it
    except ImportError:
        return
    try:
        numpy.random.RandomState().set_state(
            (
                numpy_state["bit_generator"],
                numpy.array(numpy_state["key"], dtype=numpy.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["gauss"],
            )
        )
    except (ValueError, TypeError, OverflowError) as e:
        raise _fail("numpy", f"is refused by NumPy: {e}") from e


def check_rng_values(state: Mapping[str, Any]) -> None:
    """Dry-run a loaded random state on scratch generators, so setting it cannot fail later.

    Checks what :func:`check_rng_state` cannot see without the data: that torch
    accepts the CPU generator's bytes and Python and NumPy their states.

    Raises:
        CorruptCheckpointError: A state the generator refuses (the key names which).
    """
    _check_plain_values(state)
    try:
        torch.Generator().set_state(state["torch"].cpu())
    except RuntimeError as e:
        raise _fail("torch", f"is refused by torch: {e}") from e


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the streams captured by :func:`capture_rng_state` (check it first).

    CUDA states are set lazily, so restoring them creates no CUDA context. When the
    number of CUDA devices differs, the devices both sides have are restored and a
    warning names the rest; a checkpoint from a GPU machine restores on a CPU one.
    """
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    torch.set_rng_state(state["torch"].cpu())

    numpy_state = state.get("numpy")
    if numpy_state is not None:
        try:
            import numpy  # noqa: PLC0415 - optional, imported only when a state needs it
        except ImportError:
            logger.warning("the checkpoint holds NumPy's random state but NumPy is not installed")
        else:
            numpy.random.set_state(
                (
                    numpy_state["bit_generator"],
                    numpy.array(numpy_state["key"], dtype=numpy.uint32),
                    numpy_state["pos"],
                    numpy_state["has_gauss"],
                    numpy_state["gauss"],
                )
            )

    cuda_states = state.get("cuda") or []
    live = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, device_state in enumerate(cuda_states[:live]):
        torch.cuda.set_rng_state(device_state.cpu(), index)
    if len(cuda_states) != live and cuda_states:
        logger.warning(
            "the checkpoint holds random states for %d CUDA devices and this process sees %d; "
            "restored the first %d",
            len(cuda_states),
            live,
            min(live, len(cuda_states)),
        )


class RandomStreams:
    """The process's global random streams as a :class:`~ckpt.Stateful` item.

    ``state_dict()`` captures them; ``load_state_dict()`` checks and restores them.
    Not thread-safe: other threads drawing random numbers meanwhile change what is captured.
    """

    def state_dict(self) -> dict[str, Any]:
        """Capture the streams (see :func:`capture_rng_state`)."""
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check and restore the streams (see :func:`set_rng_state`).

        Warns once when they were saved with another world size (not at each check:
        a restore checks them when it plans and again when it applies).
        """
        check_rng_state(state_dict)
        saved, (_, world_size) = state_dict["world_size"], _process_rank()
        if saved != world_size:
            logger.warning(
                "random state saved with world size %d restored with world size %d",
                saved,
                world_size,
            )
        set_rng_state(state_dict)

    def check_state_dict(self, state_dict: object) -> None:
        """Check a saved state without restoring it (see :func:`check_rng_state`)."""
        check_rng_state(state_dict)
