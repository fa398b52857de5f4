"""Format version 2: small tensors packed together, and compressed manifests."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from conftest import assert_same_state
from helpers import ManySmall, restore_matches_torch, train_steps
from safetensors import safe_open

import ckpt
import ckpt.format.bounds
import ckpt.format.manifest
import ckpt.state.items
from ckpt.format import MANIFEST_NAME, decode_manifest, step_dir_name
from ckpt.format.checksums import hash_bytes
from ckpt.state.items import PACK_MAX_BYTES, PACK_MIN_TENSORS


def many_small(count: int = 10_000, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(64, generator=gen) for i in range(count)}


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def disk_bytes(root, step: int) -> int:
    return sum(p.stat().st_size for p in (root / step_dir_name(step)).iterdir())


def manifest_doc(root, step: int) -> dict:
    raw = (root / step_dir_name(step) / MANIFEST_NAME).read_bytes()
    if raw.startswith(b"x"):
        raw = zlib.decompress(raw)
    return json.loads(raw)


def test_ten_thousand_small_tensors_take_at_most_five_percent_more_than_their_bytes(tmp_path):
    state = many_small()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data=state, rng=False)
    ratio = disk_bytes(tmp_path, 0) / tensor_bytes(state)
    assert ratio <= 1.05, ratio
    live = many_small(seed=1)
    mgr.restore(data=live, rng=False)
    assert_same_state(live, state)
    mgr.verify(0)


def test_the_pack_is_one_safetensors_tensor_and_the_manifest_says_where_each_one_sits(tmp_path):
    state = many_small(PACK_MIN_TENSORS)
    state["big"] = torch.zeros(PACK_MAX_BYTES // 4 + 1)
    ckpt.CheckpointManager(tmp_path).save(0, data=state, rng=False)
    step_dir = tmp_path / step_dir_name(0)
    with safe_open(step_dir / "data.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["data/#pack", "data/big"]
        assert f.get_tensor("data/#pack").dtype == torch.uint8
    doc = manifest_doc(tmp_path, 0)
    assert doc["format_version"] == 2
    assert doc["tensors"]["data/t0"]["pack"] == "data/#pack"
    assert "pack" not in doc["tensors"]["data/big"]


def test_fewer_small_tensors_than_the_threshold_stay_format_v1(tmp_path):
    ckpt.CheckpointManager(tmp_path).save(0, data=many_small(PACK_MIN_TENSORS - 1), rng=False)
    doc = manifest_doc(tmp_path, 0)
    assert doc["format_version"] == 1
    assert not any("pack" in r for r in doc["tensors"].values())


def every_dtype_and_shape() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    base = [
        torch.randn(3, generator=gen).to(torch.float16),
        torch.randn(5, generator=gen).to(torch.bfloat16),
        torch.randn(2, 2, generator=gen, dtype=torch.float64),
        torch.tensor(7, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randint(-5, 5, (7,), generator=gen, dtype=torch.int8),
        torch.zeros(0, 4),
        torch.randn(3, generator=gen, dtype=torch.complex64),
        torch.tensor(2.5),
        torch.arange(6, dtype=torch.int16).reshape(2, 3).t(),  # not contiguous
    ]
    return {f"x{i}": base[i % len(base)].clone() for i in range(PACK_MIN_TENSORS + 6)}


def test_packed_dtypes_shapes_and_layouts_round_trip(tmp_path):
    state = every_dtype_and_shape()
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data=state, rng=False)
    assert manifest_doc(tmp_path, 0)["format_version"] == 2
    assert_same_state(mgr.read(0)["data"], state)
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    mgr.restore(data=live, rng=False)
    assert_same_state(live, state)


def test_packed_tensors_follow_map_location_and_meta(tmp_path):
    state = many_small(PACK_MIN_TENSORS)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data=state, rng=False)
    on_meta = mgr.read(0, map_location="meta")["data"]
    assert all(t.device.type == "meta" and t.shape == (64,) for t in on_meta.values())
    mapped = mgr.read(0, map_location=lambda storage, location: storage)["data"]
    assert_same_state(mapped, state)


@pytest.mark.parametrize("live_state", ["fresh", "trained"])
@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ],
    ids=["AdamW", "Adam-fused", "SGD"],
)
def test_packed_model_and_optimizer_restore_like_torch(tmp_path, make, live_state):
    model = ManySmall(0)
    opt = make(model.parameters())
    train_steps(model, opt, 3)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(3, model=model, optimizer=opt)
    assert manifest_doc(tmp_path, 3)["format_version"] == 2

    ours_model, ref_model = ManySmall(1), ManySmall(1)
    ours_opt, ref_opt = make(ours_model.parameters()), make(ref_model.parameters())
    if live_state == "trained":
        train_steps(ours_model, ours_opt, 2, seed=5)
        train_steps(ref_model, ref_opt, 2, seed=5)
    pointer = ours_model.layers[7].weight.data_ptr()

    def copied_in_place_from_the_pack() -> None:
        assert ours_model.layers[7].weight.data_ptr() == pointer

    restore_matches_torch(
        mgr,
        (model, opt),
        (ours_model, ours_opt),
        (ref_model, ref_opt),
        after_restore=copied_in_place_from_the_pack,
    )


def test_a_packed_model_loads_into_another_dtype_like_torch(tmp_path):
    model = ManySmall(0)
    ckpt.CheckpointManager(tmp_path).save(1, model=model)
    ours, ref = ManySmall(1).double(), ManySmall(1).double()
    ckpt.CheckpointManager(tmp_path).restore(model=ours)
    ref.load_state_dict(model.state_dict())
    assert_same_state(ours.state_dict(), ref.state_dict())


def test_async_save_of_a_pack_holds_the_state_of_when_save_returned(tmp_path):
    state = many_small(PACK_MIN_TENSORS * 2)
    expected = {k: v.clone() for k, v in state.items()}
    with ckpt.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(0, data=state, rng=False)
        for t in state.values():
            t.add_(1)
    assert_same_state(ckpt.CheckpointManager(tmp_path).read(0)["data"], expected)


def test_packs_round_trip_through_a_memory_filesystem():
    url = "memory://ckpt-packing-test"
    state = many_small(PACK_MIN_TENSORS * 3)
    mgr = ckpt.CheckpointManager(url)
    mgr.save(0, data=state, rng=False)
    live = many_small(PACK_MIN_TENSORS * 3, seed=1)
    mgr.restore(data=live, rng=False)
    assert_same_state(live, state)
    mgr.verify(0)


def test_a_flipped_byte_in_a_pack_is_caught_and_changes_nothing(tmp_path):
    state = many_small(PACK_MIN_TENSORS)
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(0, data=state, rng=False)
    path = tmp_path / step_dir_name(0) / "data.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    live = many_small(PACK_MIN_TENSORS, seed=1)
    before = {k: v.clone() for k, v in live.items()}
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        mgr.restore(data=live, rng=False)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        mgr.verify(0)
    assert_same_state(live, before)


# ------------------------------------------------------------------ the manifest


def sealed(doc: dict, compress: bool) -> bytes:
    body = json.dumps(doc, separators=(",", ":")).encode()
    raw = body[:-1] + b',"checksum":"' + hash_bytes(body).encode() + b'"}\n'
    return zlib.compress(raw) if compress else raw


@pytest.fixture
def packed_doc(tmp_path) -> dict:
    ckpt.CheckpointManager(tmp_path).save(0, data=many_small(PACK_MIN_TENSORS), rng=False)
    doc = manifest_doc(tmp_path, 0)
    doc.pop("checksum")
    return doc


def _set(key: str, field: str, value: object):
    return lambda doc: doc["tensors"][key].__setitem__(field, value)


def _drop_pack_tensor(doc: dict) -> None:
    del doc["tensors"]["data/#pack"]


def _shrink_pack(doc: dict) -> None:
    doc["tensors"]["data/#pack"]["shape"] = [64]


def _pack_as_float(doc: dict) -> None:
    doc["tensors"]["data/#pack"]["dtype"] = "float32"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("data/t0", "offset", 2), "not aligned"),
        (_set("data/t0", "offset", 256), "overlap or leave a gap"),
        (_set("data/t0", "offset", -4), "non-negative"),
        (_set("data/t0", "offset", "0"), "non-negative"),
        (_set("data/t0", "pack", "data/t1"), "not a stored tensor"),
        (_set("data/t0", "pack", "data/nowhere"), "not a stored tensor"),
        (_set("data/t0", "pack", 3), "pack must be a tensor name"),
        (_set("data/t0", "shape", [65]), "overlap or leave a gap"),
        (_set("data/t0", "extra", 1), "unknown fields"),
        (_drop_pack_tensor, "not a stored tensor"),
        (_shrink_pack, "members cover"),
        (_pack_as_float, "1-d uint8"),
    ],
    ids=[
        "misaligned",
        "overlapping",
        "negative",
        "offset a string",
        "pack is a packed tensor",
        "pack missing",
        "pack not a name",
        "member grown",
        "unknown field",
        "pack record dropped",
        "pack too small",
        "pack not bytes",
    ],
)
def test_malformed_packs_are_refused_with_the_key_at_fault(packed_doc, edit, message):
    edit(packed_doc)
    with pytest.raises(ckpt.CorruptCheckpointError, match=message):
        decode_manifest(sealed(packed_doc, compress=False), "manifest.json")


def test_offset_without_pack_is_refused(packed_doc):
    packed_doc["tensors"]["data/#pack"]["offset"] = 0
    with pytest.raises(ckpt.CorruptCheckpointError, match="offset without a pack"):
        decode_manifest(sealed(packed_doc, compress=False), "manifest.json")


def test_large_manifests_are_compressed_and_small_ones_are_plain_json(tmp_path):
    ckpt.CheckpointManager(tmp_path / "big").save(0, data=many_small(2000), rng=False)
    ckpt.CheckpointManager(tmp_path / "small").save(0, data={"x": torch.ones(3)}, rng=False)
    big = (tmp_path / "big" / step_dir_name(0) / MANIFEST_NAME).read_bytes()
    small = (tmp_path / "small" / step_dir_name(0) / MANIFEST_NAME).read_bytes()
    assert big.startswith(b"x") and json.loads(zlib.decompress(big))["format_version"] == 2
    assert small.startswith(b"{") and json.loads(small)["format_version"] == 1


def test_a_compressed_manifest_decodes_like_its_json(packed_doc):
    plain = decode_manifest(sealed(packed_doc, compress=False), "m")
    assert decode_manifest(sealed(packed_doc, compress=True), "m") == plain


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "truncated"),
        (lambda raw: raw + b"trailing", "followed by other bytes"),
        (lambda raw: raw[:10] + bytes(b ^ 0x5A for b in raw[10:20]) + raw[20:], "damaged|checksum"),
        (lambda raw: b"x" + b"\x00" * 40, "damaged"),
    ],
    ids=["truncated", "trailing bytes", "flipped", "not zlib"],
)
def test_damaged_compressed_manifests_are_refused(packed_doc, damage, message):
    raw = damage(sealed(packed_doc, compress=True))
    with pytest.raises(ckpt.CorruptCheckpointError, match=message):
        decode_manifest(raw, "manifest.json")


def test_a_compressed_manifest_cannot_inflate_past_the_limit(monkeypatch):
    bomb = zlib.compress(b"{" + b" " * 10_000_000 + b"}", 9)
    assert len(bomb) < 20_000
    monkeypatch.setattr(ckpt.format.bounds, "MAX_MANIFEST_BYTES", 1_000_000)
    with pytest.raises(ckpt.CorruptCheckpointError, match="inflates past"):
        decode_manifest(bomb, "manifest.json")


def test_format_v1_readers_are_told_v2_is_newer(packed_doc, monkeypatch):
    monkeypatch.setattr(ckpt.format.manifest, "FORMAT_VERSION", 1)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="newer"):
        decode_manifest(sealed(packed_doc, compress=False), "manifest.json")
