"""The safetensors reader/writer against the safetensors library, and header validation."""

from __future__ import annotations

import io
import json
import struct

import pytest
import safetensors.torch
import torch

import ckpt
from ckpt.format.tensorfile import (
    dtype_name,
    encode_header,
    layout,
    parse_header,
    read_tensor,
    tensor_bytes,
    write_tensors,
)

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
]  # fmt: skip


def sample(dtype: torch.dtype, shape=(3, 2)) -> torch.Tensor:
    raw = torch.randint(
        0,
        255,
        (*shape, torch.empty((), dtype=dtype).element_size()),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(3),
    )
    return raw.view(dtype).reshape(shape) if dtype != torch.bool else raw[..., 0] % 2 == 1


def all_dtypes() -> dict[str, torch.Tensor]:
    out = {f"t_{str(d).removeprefix('torch.')}": sample(d) for d in DTYPES}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 4)
    out["odd"] = torch.arange(3, dtype=torch.int8)  # would misalign what follows
    return out


def read_all(raw: bytes) -> dict[str, torch.Tensor]:
    entries, _, start = parse_header(raw, len(raw), "mem")
    f = io.BytesIO(raw)
    return {name: read_tensor(f, e, start, "mem") for name, e in entries.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return tensor_bytes(a.contiguous()).tobytes() == tensor_bytes(b.contiguous()).tobytes()


def test_library_reads_what_we_write():
    tensors = all_dtypes()
    buf = io.BytesIO()
    n = write_tensors(buf, tensors, {"format": "pt"})
    assert n == len(buf.getvalue())
    back = safetensors.torch.load(buf.getvalue())
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert same_bits(back[name], t), name


def test_we_read_what_the_library_writes():
    tensors = all_dtypes()
    raw = safetensors.torch.save(tensors, {"format": "pt"})
    back = read_all(raw)
    for name, t in tensors.items():
        assert same_bits(back[name], t), name


def test_every_tensor_is_aligned_to_its_element_size():
    entries = layout(all_dtypes())
    header = encode_header(entries, None)
    assert len(header) % 8 == 0
    for e in entries:
        assert e.begin % torch.empty((), dtype=e.dtype).element_size() == 0, e.name


def test_non_contiguous_and_conjugate_views_are_written_by_value():
    t = torch.arange(12.0).reshape(3, 4).t()
    c = torch.randn(3, dtype=torch.complex64).conj()
    buf = io.BytesIO()
    write_tensors(buf, {"t": t, "c": c})
    back = read_all(buf.getvalue())
    assert torch.equal(back["t"], t) and torch.equal(back["c"], c.resolve_conj())


def test_unsupported_dtype_is_refused_before_writing():
    with pytest.raises(TypeError, match="cannot be stored"):
        dtype_name(torch.complex128)


def header(doc: object, pad: bytes = b"") -> bytes:
    raw = json.dumps(doc).encode()
    return struct.pack("<Q", len(raw)) + raw + pad


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "too short"),
        (b"\x05\x00", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "exceeds"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (header([1, 2]), "not a JSON object"),
        (struct.pack("<Q", 13) + b'{"a":1,"a":1}', "duplicate key"),
        (header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "covers 8"),
        (
            header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"x" * 4),
            "byte count",
        ),
        (
            header({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"x" * 4),
            "malformed",
        ),
        (
            header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"x" * 4),
            "malformed",
        ),
        (
            header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"x" * 4),
            "malformed",
        ),
        (
            header(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"x" * 8,
            ),
            "overlap",
        ),
        (
            header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"x" * 8),
            "gap",
        ),
        (header({"__metadata__": {"a": 1}}), "__metadata__"),
    ],
)
def test_malformed_headers_are_corrupt_checkpoint_errors(raw, match):
    with pytest.raises(ckpt.CorruptCheckpointError, match=match):
        parse_header(raw, len(raw), "f.safetensors")


def test_truncated_data_is_reported_with_the_tensor_name():
    buf = io.BytesIO()
    write_tensors(buf, {"w": torch.ones(100)})
    raw = buf.getvalue()
    entries, _, start = parse_header(raw, len(raw), "f")
    with pytest.raises(ckpt.CorruptCheckpointError, match="ends after") as info:
        read_tensor(io.BytesIO(raw[:-10]), entries["w"], start, "f")
    assert info.value.key == "w"
