"""Turn nested training state into typed JSON plus named tensors, and back.

Pure functions, no I/O. :func:`flatten` walks a nested value (dicts, lists,
tuples, scalars, tensors) and returns a JSON-compatible tree in which every
tensor is replaced by a reference ``{"$tensor": name}``; the tensors themselves
are returned separately, keyed by that name. :func:`unflatten` is the exact
inverse. The encoding keeps what a plain ``json.dumps`` would lose:

==========================  ======================================
Python value                JSON
==========================  ======================================
``None``, ``bool``, ``str`` itself
``int``                     itself (arbitrary size)
finite ``float``            itself (``repr`` round-trips exactly)
``nan``, ``inf``, ``-inf``  ``{"$float": "nan" | "inf" | "-inf"}``
``list``                    array
``tuple``                   ``{"$tuple": [...]}``
``dict`` with ``str`` keys  object (when no key starts with ``$``)
any other ``dict``          ``{"$dict": [[key, value], ...]}``
``bytes``                   ``{"$bytes": "<base64>"}``
``torch.dtype``             ``{"$dtype": "float32"}``
``torch.device``            ``{"$device": "cuda:0"}``
``torch.Tensor``            ``{"$tensor": "<name>"}``
a tensor that requires grad ``{"$requires_grad": "<name>"}``
``nn.Parameter``            ``{"$param": {"tensor": "<name>", "requires_grad": bool}}``
==========================  ======================================

Dict keys may be ``str`` or ``int``; insertion order is kept; dict subclasses
are stored, and read back, as ``dict``. A tensor's name is
its escaped key path (``/`` separated; ``%``, ``/``, ``#`` and NUL escaped;
``int`` dict keys written ``#N``), so names are unique and readable. A tensor
that appears twice (tied weights: the same memory, dtype, shape, strides and
conjugate/negative bits) is stored once and both places refer to the one name;
``x.conj()``, ``x.imag`` or a negative view of ``x`` hold other values over the
same memory, so they are stored apart. Parameters and tensors that require grad
come back as such (new leaves over the stored tensor, one per name and kind).
Anything else cannot be stored without pickle and raises :class:`TypeError`
naming its key path.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from ckpt.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Json",
    "KeyPath",
    "check_text",
    "flatten",
    "format_key_path",
    "loads_strict",
    "placeholder",
    "tensor_name",
    "tensor_refs",
    "tensors_by_path",
    "unflatten",
]

Json: TypeAlias = Any
"""A JSON value: ``None``, ``bool``, ``int``, ``float``, ``str``, a list or a str-keyed dict."""

KeyPath: TypeAlias = tuple[str | int, ...]
"""Where a value sits in a nested state: dict keys and list/tuple indices, outermost first."""

_TAGS = frozenset(
    {
        "$float",
        "$tuple",
        "$dict",
        "$bytes",
        "$dtype",
        "$device",
        "$tensor",
        "$param",
        "$requires_grad",
    }
)
_PARAM_KEYS = frozenset({"tensor", "requires_grad"})
_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# torch is imported where tensors, dtypes or devices are made, not with this module:
# decoding a tree of plain values (describing a manifest) needs no torch.


def _escape(component: str) -> str:
    return (
        component.replace("%", "%25").replace("/", "%2F").replace("#", "%23").replace("\x00", "%00")
    )


def tensor_name(prefix: str, path: KeyPath, *, in_sequence: tuple[bool, ...] | None = None) -> str:
    """Return the stored name of the tensor at ``path`` under ``prefix``.

    ``str`` keys are escaped, ``int`` dict keys become ``#N`` and sequence
    indices (marked by ``in_sequence``) stay plain digits, so ``{0: t}`` and
    ``{"0": t}`` get different names.
    """
    parts = [_escape(prefix)]
    for i, key in enumerate(path):
        if isinstance(key, str):
            parts.append(_escape(key))
        elif in_sequence is not None and in_sequence[i]:
            parts.append(str(key))
        else:
            parts.append(f"#{key}")
    return "/".join(parts)


def check_text(text: str, what: str) -> None:
    """Raise ``TypeError`` unless ``text`` can be encoded as UTF-8 (no lone surrogates).

    ``what`` names the string in the message. ASCII text is accepted without an
    encode attempt.
    """
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TypeError(
            f"cannot store {what}: it is not valid Unicode text (it holds the lone surrogate "
            f"{text[e.start]!r} at index {e.start}, which cannot be encoded as UTF-8)"
        ) from None


def format_key_path(prefix: str, path: KeyPath) -> str:
    """Format a key path for error messages, like ``optimizer['state'][0]['exp_avg']``."""
    return prefix + "".join(f"[{key!r}]" for key in path)


def _tensor_identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    import torch  # noqa: PLC0415 - see the note above (imported: a lookup)

    if t.layout != torch.strided or t.device.type == "meta":
        return None
    ptr = t.data_ptr()
    if ptr == 0:
        return None
    # Everything that decides the values read through this memory: a conjugate or
    # negative view, another dtype, offset (in the pointer), shape or strides.
    return (str(t.device), ptr, t.dtype, tuple(t.shape), t.stride(), t.is_conj(), t.is_neg())


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # some key came twice: find the first (rare, so walked only then)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(raw: bytes) -> Json:
    """Parse UTF-8 JSON, rejecting duplicate keys and ``NaN``/``Infinity`` literals.

    Raises:
        ValueError: Not UTF-8, not JSON, or one of the above (``UnicodeDecodeError``
            and ``json.JSONDecodeError`` are ``ValueError`` subclasses).
        RecursionError: Nested too deeply to parse.
    """
    return json.loads(
        raw.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys
    )


def tensors_by_path(state: Any) -> dict[KeyPath, torch.Tensor]:
    """Map the key path of every tensor in a nested state (dicts, lists, tuples) to the tensor."""
    import torch  # noqa: PLC0415 - see the note above

    found: dict[KeyPath, torch.Tensor] = {}

    def visit(obj: Any, path: KeyPath) -> None:
        if isinstance(obj, torch.Tensor):
            found.setdefault(path, obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, (*path, k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, (*path, i))

    visit(state, ())
    return found


def flatten(value: Any, prefix: str) -> tuple[Json, dict[str, torch.Tensor]]:
    """Encode ``value`` as typed JSON with tensors pulled out.

    Args:
        value: Nested state: dicts (``str``/``int`` keys), lists, tuples,
            ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``,
            ``torch.dtype``, ``torch.device`` and dense tensors.
        prefix: The first component of every tensor name (the item name).

    Returns:
        The JSON tree and ``{name: tensor}`` (tensors as given, detached).

    Raises:
        TypeError: A value or key cannot be stored without pickle; the message
            names its key path.
    """
    import torch  # noqa: PLC0415 - see the note above

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}

    def visit(obj: Any, path: KeyPath, seq: tuple[bool, ...]) -> Json:
        if isinstance(obj, str):
            check_text(obj, f"the string at {format_key_path(prefix, path)}")
            return obj
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)
            return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if isinstance(obj, torch.Tensor):
            name = add_tensor(obj, path, seq)
            if isinstance(obj, torch.nn.Parameter):
                return {"$param": {"tensor": name, "requires_grad": obj.requires_grad}}
            return {"$requires_grad": name} if obj.requires_grad else {"$tensor": name}
        if type(obj) is list:
            return [visit(v, (*path, i), (*seq, True)) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {"$tuple": [visit(v, (*path, i), (*seq, True)) for i, v in enumerate(obj)]}
        if isinstance(obj, dict):
            return visit_dict(obj, path, seq)
        if isinstance(obj, bytes):
            return {"$bytes": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, torch.dtype):
            return {"$dtype": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"$device": str(obj)}
        raise TypeError(
            f"cannot store a value of type {type(obj).__qualname__} at "
            f"{format_key_path(prefix, path)} without pickle; convert it to tensors, "
            "numbers, strings, lists, tuples or dicts (for example in state_dict())"
        )

    def visit_dict(obj: dict[Any, Any], path: KeyPath, seq: tuple[bool, ...]) -> Json:
        for key in obj:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(
                    f"cannot store dict key {key!r} of type {type(key).__qualname__} at "
                    f"{format_key_path(prefix, path)}; only str and int keys are supported"
                )
            if isinstance(key, str):
                check_text(key, f"the dict key {key!r} at {format_key_path(prefix, path)}")
        items = [(key, visit(v, (*path, key), (*seq, False))) for key, v in obj.items()]
        if all(isinstance(key, str) and not key.startswith("$") for key in obj):
            return dict(items)
        return {"$dict": [[int(key) if isinstance(key, int) else key, v] for key, v in items]}

    def add_tensor(t: torch.Tensor, path: KeyPath, seq: tuple[bool, ...]) -> str:
        if t.layout != torch.strided:
            where = format_key_path(prefix, path)
            raise TypeError(f"cannot store a {t.layout} tensor at {where}; convert it to dense")
        if t.is_quantized or t.is_nested:
            where = format_key_path(prefix, path)
            raise TypeError(f"cannot store a quantized or nested tensor at {where}")
        if t.device.type == "meta":
            where = format_key_path(prefix, path)
            raise TypeError(f"cannot store a meta tensor at {where}: it holds no data")
        identity = _tensor_identity(t)
        if identity is not None and identity in seen:
            return seen[identity]
        name = tensor_name(prefix, path, in_sequence=seq)
        tensors[name] = t.detach()
        if identity is not None:
            seen[identity] = name
        return name

    return visit(value, (), ()), tensors


def unflatten(
    tree: Json, tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]
) -> Any:
    """Decode a tree made by :func:`flatten`, putting the tensors back.

    Args:
        tree: The typed JSON tree.
        tensors: The tensors by name, or a function returning the tensor for a name.
            A name referenced twice gets the same tensor object both times when
            ``tensors`` is a mapping (or a function that caches).

    Raises:
        CorruptCheckpointError: The tree is malformed or names an unknown tensor;
            the message names the key path.
    """
    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    return _decode(tree, lambda name, _path: get(name))


def unflatten_at(tree: Json, lookup: Callable[[str, KeyPath], torch.Tensor]) -> Any:
    """Decode a tree like :func:`unflatten`, asking ``lookup(name, key path)`` for each tensor.

    The key path is where the tensor lands in the decoded state (inside an
    ``nn.Parameter`` or ``requires_grad`` tag, the path of that leaf).

    Raises:
        CorruptCheckpointError: The tree is malformed; the message names the key path.
    """
    return _decode(tree, lookup)


def tensor_refs(tree: Json) -> list[tuple[KeyPath, str]]:
    """List ``(key path, tensor name)`` for every tensor reference in a tree, in order.

    The key paths are those :func:`unflatten` produces, so a caller can decide
    where each tensor should be built from where it will land.

    Raises:
        CorruptCheckpointError: The tree is malformed.
    """
    found: list[tuple[KeyPath, str]] = []

    def record(name: str, path: KeyPath) -> torch.Tensor:
        found.append((path, name))
        return placeholder()

    _decode(tree, record)
    return found


_PLACEHOLDER: list[Any] = []
_NOT_A_TENSOR: Any = object()


def placeholder() -> torch.Tensor:
    """What a lookup that only collects references returns for a tensor.

    An empty tensor once torch is imported; before that (nothing to build: a
    ``$param`` or ``$requires_grad`` imports torch before its lookup) a plain
    object, so that decoding a tree of plain tensor references needs no torch.
    """
    if _PLACEHOLDER:
        held: torch.Tensor = _PLACEHOLDER[0]
        return held
    if "torch" not in sys.modules:
        return _NOT_A_TENSOR  # type: ignore[no-any-return]
    import torch  # noqa: PLC0415 - imported: a lookup

    _PLACEHOLDER.append(torch.empty(0))
    return placeholder()


def _is_param_arg(arg: Json) -> bool:
    return (
        isinstance(arg, dict)
        and set(arg) == _PARAM_KEYS
        and isinstance(arg["tensor"], str)
        and isinstance(arg["requires_grad"], bool)
    )


def _leaf(t: torch.Tensor, parameter: bool, requires_grad: bool) -> torch.Tensor:
    """A new leaf over ``t``'s memory: an ``nn.Parameter``, or a tensor that requires grad."""
    import torch  # noqa: PLC0415 - see the note above

    if type(t) is object:  # placeholder() from before torch was imported
        t = placeholder()
    if parameter:
        return torch.nn.Parameter(t.detach(), requires_grad=requires_grad)
    return t.detach().requires_grad_(requires_grad)


_DTYPES: list[dict[str, Any]] = []


def _dtypes() -> dict[str, Any]:
    """The dtypes of torch by name (imports torch)."""
    if not _DTYPES:
        import torch  # noqa: PLC0415 - see the note above

        # Built whole, then stored: a thread never sees half of it.
        _DTYPES.append(
            {
                str(d).removeprefix("torch."): d
                for d in vars(torch).values()
                if isinstance(d, torch.dtype)
            }
        )
    return _DTYPES[0]


def _device(text: str) -> Any:
    """``torch.device(text)`` (imports torch)."""
    import torch  # noqa: PLC0415 - see the note above

    return torch.device(text)


def _decode(tree: Json, lookup: Callable[[str, KeyPath], torch.Tensor]) -> Any:
    def bad(path: KeyPath, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"malformed state tree: {why}", key=format_key_path("", path))

    def visit(node: Json, path: KeyPath) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [visit(v, (*path, i)) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise bad(path, f"unexpected JSON value of type {type(node).__name__}")
        if len(node) == 1:
            ((tag, arg),) = node.items()
            if tag in _TAGS:
                return visit_tagged(tag, arg, path)
        if any(k.startswith("$") for k in node):
            raise bad(path, "unknown or misplaced '$' tag")
        return {k: visit(v, (*path, k)) for k, v in node.items()}

    def visit_tagged(tag: str, arg: Json, path: KeyPath) -> Any:
        if tag == "$tuple" and isinstance(arg, list):
            return tuple(visit(v, (*path, i)) for i, v in enumerate(arg))
        if tag == "$dict" and isinstance(arg, list):
            out: dict[Any, Any] = {}
            for pair in arg:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise bad(path, "$dict entries must be [key, value] pairs")
                key = pair[0]
                if isinstance(key, bool) or not isinstance(key, (str, int)) or key in out:
                    raise bad(path, f"invalid or duplicate $dict key {key!r}")
                out[key] = visit(pair[1], (*path, key))
            return out
        if tag == "$float" and arg in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[arg]
        if tag == "$bytes" and isinstance(arg, str):
            try:
                return base64.b64decode(arg, validate=True)
            except ValueError as e:
                raise bad(path, "invalid base64 in $bytes") from e
        if tag == "$dtype" and isinstance(arg, str) and arg in _dtypes():
            return _dtypes()[arg]
        if tag == "$device" and isinstance(arg, str):
            try:
                return _device(arg)
            except RuntimeError as e:
                raise bad(path, f"invalid device {arg!r}") from e
        if tag == "$tensor" and isinstance(arg, str):
            return tensor(arg, path)
        if tag == "$requires_grad" and isinstance(arg, str):
            return leaf(arg, path, (False, True))
        if tag == "$param" and _is_param_arg(arg):
            return leaf(arg["tensor"], path, (True, arg["requires_grad"]))
        raise bad(path, f"invalid argument for {tag}")

    def tensor(name: str, path: KeyPath) -> torch.Tensor:
        try:
            return lookup(name, path)
        except KeyError as e:
            raise bad(path, f"reference to unknown tensor {name!r}") from e

    leaves: dict[tuple[str, bool, bool], torch.Tensor] = {}

    def leaf(name: str, path: KeyPath, kind: tuple[bool, bool]) -> torch.Tensor:
        # One new tensor object per stored tensor and kind; other places share the stored one.
        t = tensor(name, path)
        if (name, *kind) not in leaves:
            try:
                leaves[(name, *kind)] = _leaf(t, *kind)
            except RuntimeError as e:  # an integer tensor cannot require grad
                raise bad(path, f"a {t.dtype} tensor cannot require grad") from e
        return leaves[(name, *kind)]

    try:
        return visit(tree, ())
    except RecursionError as e:
        raise CorruptCheckpointError("state tree is nested too deeply") from e
