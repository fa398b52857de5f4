"""Hostile inputs for tiers and copies: roots that are one another, foreign files, bad arguments."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from helpers import bounded, fingerprint

import ckpt
from ckpt.cli import main
from ckpt.storage.remote import RemoteStorage
from ckpt.tiers.tierset import roots_overlap


def state(step: int) -> dict[str, object]:
    return {"w": torch.full((8, 4), float(step)), "step": step}


def listed(url) -> list[int]:
    return ckpt.CheckpointReader(url).all_steps()


def save_steps(root, steps, **kwargs) -> None:
    with ckpt.CheckpointManager(root, **kwargs) as mgr:
        for step in steps:
            mgr.save(step, data=state(step))


@pytest.mark.parametrize("spelling", ["link", "file_url", "trailing_slash", "dotted"])
def test_a_tier_that_is_the_directory_under_another_name_is_refused(tmp_path, spelling):
    first = tmp_path / "t0"
    first.mkdir()
    if spelling == "link":
        os.symlink(first, tmp_path / "link")
        url = str(tmp_path / "link")
    elif spelling == "file_url":
        url = f"file://{first}"
    elif spelling == "trailing_slash":
        url = f"{first}/"
    else:
        url = f"{tmp_path}/x/../t0"
    with bounded(), pytest.raises(ValueError, match="repeats the directory"):
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(url, keep_last=1)])


@pytest.mark.parametrize("where", ["tier_in_first", "first_in_tier", "tier_in_a_step"])
def test_a_tier_nested_with_the_directory_is_refused(tmp_path, where):
    first = tmp_path / "t0"
    tier = {
        "tier_in_first": first / "backup",
        "first_in_tier": tmp_path,
        "tier_in_a_step": first / "step_000000000000" / "t1",
    }[where]
    with bounded(), pytest.raises(ValueError, match="inside it or around it"):
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(tier, keep_last=1)])
    assert not tier.exists() or tier == tmp_path


def test_roots_overlap_by_whole_names():
    assert roots_overlap("s3://b/run", "s3://b/run/")
    assert roots_overlap("s3://b/run", "s3://b/run/tier")
    assert not roots_overlap("s3://b/run", "s3://b/run2")
    assert not roots_overlap("/a/run", "/a/run2")
    assert not roots_overlap("s3://b/run", "gs://b/run/x")
    assert roots_overlap("/a/run/", "file:///a/run/x/..")
    assert roots_overlap("/", "/a/run")


def test_two_tiers_that_are_one_directory_are_refused(tmp_path):
    (tmp_path / "t1").mkdir()
    os.symlink(tmp_path / "t1", tmp_path / "alias")
    tiers = [ckpt.Tier(tmp_path / "t1"), ckpt.Tier(tmp_path / "alias")]
    with bounded(), pytest.raises(ValueError, match="repeats the directory or another tier"):
        ckpt.CheckpointManager(tmp_path / "t0", tiers=tiers)


@pytest.mark.parametrize(("url", "error"), [(None, TypeError), (5, TypeError), ("", ValueError)])
def test_a_tier_url_that_is_no_path_is_refused_at_once(url, error):
    with pytest.raises(error, match=r"Tier\.url"):
        ckpt.Tier(url)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": -1},
        {"keep_every": 0},
        {"keep_last": True},
        {"every_steps": 0},
        {"every_steps": 2.0},
        {"max_backlog": 0},
        {"best_mode": "avg"},
        {"keep_best": 1},
    ],
)
def test_tier_rules_are_checked_at_construction(tmp_path, kwargs):
    with pytest.raises(ValueError):
        ckpt.Tier(tmp_path, **kwargs)


def test_tier_storage_options_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        ckpt.Tier(tmp_path, storage_options=[("anon", True)])  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_foreign_entry_at_a_step_name_in_a_tier_skips_only_that_step(tmp_path, caplog, kind):
    first, tier = tmp_path / "t0", tmp_path / "t1"
    tier.mkdir()
    foreign = tier / "step_000000000001"
    if kind == "file":
        foreign.write_text("not ckpt's")
    else:
        os.mkfifo(foreign)
    tiers = [ckpt.Tier(tier)]
    with (
        bounded(),
        caplog.at_level(logging.WARNING, logger="ckpt"),
        ckpt.CheckpointManager(first, tiers=tiers) as mgr,
    ):
        for step in range(4):
            mgr.save(step, data=state(step))
    assert listed(tier) == [0, 2, 3]  # the newer steps were not blocked behind step 1
    assert listed(first) == [0, 1, 2, 3]
    assert foreign.exists() and not foreign.is_dir()  # not ckpt's: left alone
    assert any("step 1 is not copied" in r.getMessage() for r in caplog.records)


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    with bounded():
        code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("spelling", ["same", "link", "file_url", "slash"])
def test_ckpt_copy_into_the_same_root_is_a_usage_error(capsys, tmp_path, spelling):
    src = tmp_path / "src"
    save_steps(src, range(2))
    before = fingerprint(src)
    dst = {
        "same": str(src),
        "link": str(tmp_path / "link"),
        "file_url": f"file://{src}",
        "slash": f"{src}/",
    }[spelling]
    os.symlink(src, tmp_path / "link")
    code, _, err = run(capsys, "copy", f"{src}:1", dst)
    assert code == 2 and "same root" in err
    assert fingerprint(src) == before


@pytest.mark.parametrize("where", ["inside", "in_a_step", "around"])
def test_ckpt_copy_between_nested_roots_is_a_usage_error(capsys, tmp_path, where):
    src = tmp_path / "run" / "src"
    save_steps(src, range(2))
    before = fingerprint(tmp_path)
    dst = {
        "inside": src / "copy",
        "in_a_step": src / "step_000000000001" / "copy",
        "around": tmp_path / "run",
    }[where]
    code, _, err = run(capsys, "copy", src, dst)
    assert code == 2 and "inside" in err
    assert fingerprint(tmp_path) == before


def test_ckpt_copy_of_a_step_not_there_names_it(capsys, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_steps(src, range(2))
    code, _, err = run(capsys, "copy", f"{src}:7", dst)
    assert code == 1 and "step 7" in err
    assert not dst.exists() or listed(dst) == []


def test_ckpt_copy_of_a_truncated_step_lists_nothing_and_keeps_the_others(capsys, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_steps(src, range(3))
    step_dir = src / "step_000000000001"
    victim = next(p for p in step_dir.iterdir() if p.name.endswith(".safetensors"))
    victim.write_bytes(victim.read_bytes()[:-3])
    code, _, err = run(capsys, "copy", src, dst)
    assert code == 1 and victim.name in err
    assert listed(dst) == [0]  # step 0 committed before step 1 failed; nothing of 1 is listed
    assert not (dst / "step_000000000001").exists()
    code, _, _ = run(capsys, "copy", f"{src}:2", dst)
    assert code == 0 and listed(dst) == [0, 2]


# ---------------------------------------------------------------- multipart uploads

PART = 5 * 2**20  # S3's minimum part


def _remote(s3_bucket) -> RemoteStorage:
    bucket, options = s3_bucket
    storage = RemoteStorage(f"s3://{bucket}/root", options)
    storage.min_part_bytes = PART
    storage.max_in_flight_bytes = 2 * PART
    storage.upload_threads = 2
    return storage


def _no_uploads(storage: RemoteStorage) -> bool:
    bucket = storage.root.split("/")[0]
    return not storage.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")


@pytest.mark.s3
@pytest.mark.parametrize("size", [0, PART, 2 * PART, PART + 1])
def test_objects_of_part_boundary_sizes_go_up_whole(s3_bucket, size):
    storage = _remote(s3_bucket)
    data = os.urandom(size)
    for hint in (None, size):
        name = f"f{size}-{hint}"
        with bounded():
            storage.write_file((name,), lambda f: f.write(data), size_hint=hint)
        assert storage.read_bytes(name) == data
    assert _no_uploads(storage)


@pytest.mark.s3
def test_an_interrupt_while_parts_upload_leaves_no_object_and_no_upload(s3_bucket):
    storage = _remote(s3_bucket)
    data = os.urandom(PART)

    def write(f) -> int:
        f.write(data)
        f.write(data)  # two parts sent
        raise KeyboardInterrupt

    with bounded(), pytest.raises(KeyboardInterrupt):
        storage.write_file(("big",), write)
    assert not storage.exists("big")
    assert _no_uploads(storage)


@pytest.mark.s3
def test_a_part_interrupted_in_its_thread_aborts_the_upload(s3_bucket):
    storage = _remote(s3_bucket)
    real = storage.fs.call_s3

    def call_s3(method, *args, **kwargs):
        if method == "upload_part" and kwargs["PartNumber"] == 2:
            raise KeyboardInterrupt  # what a signal would do there
        return real(method, *args, **kwargs)

    storage.fs.call_s3 = call_s3
    data = os.urandom(4 * PART)
    with bounded(), pytest.raises(KeyboardInterrupt):
        storage.write_file(("big",), lambda f: f.write(data))
    storage.fs.call_s3 = real
    assert not storage.exists("big")
    assert _no_uploads(storage)


def test_a_step_saved_again_differently_is_flagged_where_a_tier_holds_the_old_one(tmp_path, caplog):
    first, tier = tmp_path / "t0", tmp_path / "t1"
    save_steps(first, range(2), tiers=[ckpt.Tier(tier)])
    assert listed(tier) == [0, 1]
    old = fingerprint(tier)
    with (
        bounded(),
        caplog.at_level(logging.WARNING, logger="ckpt"),
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(tier)]) as mgr,
    ):
        mgr.save(1, data=state(7), overwrite=True)
    assert fingerprint(tier) == old  # never replaced behind the user's back
    assert any("differs from step 1" in r.getMessage() for r in caplog.records)


def test_two_runs_sharing_a_tier_never_mix_their_files(tmp_path, caplog):
    tier = tmp_path / "shared"
    save_steps(tmp_path / "a", range(2), tiers=[ckpt.Tier(tier)])
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        save_steps(tmp_path / "b", range(3), tiers=[ckpt.Tier(tier)])
    assert listed(tier) == [0, 1, 2]
    assert any("differs from step 0" in r.getMessage() for r in caplog.records)
    reader = ckpt.CheckpointReader(tier)
    assert reader.read(0)["data"]["step"] == 0  # run a's copy, whole and verifiable
    reader.verify(0)


def tensor_file(root, step: int):
    directory = root / f"step_{step:012d}"
    return next(p for p in directory.iterdir() if p.name.endswith(".safetensors"))


@pytest.mark.parametrize("damage", ["link", "fifo", "step_link", "manifest_garbage"])
def test_a_hostile_newest_step_in_the_first_tier_restores_from_the_next(tmp_path, caplog, damage):
    first, second = tmp_path / "t0", tmp_path / "t1"
    save_steps(first, range(3), tiers=[ckpt.Tier(second)])
    path = tensor_file(first, 2)
    outside = tmp_path / "outside.bin"
    if damage == "link":
        outside.write_bytes(path.read_bytes())
        path.unlink()
        os.symlink(outside, path)
    elif damage == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif damage == "step_link":
        step = first / "step_000000000002"
        os.rename(step, tmp_path / "moved")
        os.symlink(tmp_path / "moved", step)
    else:
        (first / "step_000000000002" / "manifest.json").write_text('{"format": "nonsense"}')
    before = fingerprint(tmp_path / "t1")
    target: dict[str, object] = {}
    with (
        bounded(),
        caplog.at_level(logging.WARNING),
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr,
    ):
        info = mgr.restore(data=target)
    assert info is not None and (info.step, info.tier) == (2, 1)
    assert torch.equal(target["w"], state(2)["w"])  # type: ignore[arg-type]
    assert fingerprint(tmp_path / "t1") == before
    warned = [r.getMessage() for r in caplog.records if "step 2" in r.getMessage()]
    if damage != "step_link":  # a linked step directory is not listed at all
        assert any("tier 0" in m for m in warned), warned


def test_a_corrupt_step_newer_than_every_other_only_in_a_tier(tmp_path, caplog):
    first, second = tmp_path / "t0", tmp_path / "t1"
    save_steps(first, range(3), tiers=[ckpt.Tier(second)])
    save_steps(tmp_path / "other", [5], tiers=[ckpt.Tier(second)])
    victim = tensor_file(second, 5)
    victim.write_bytes(victim.read_bytes()[:-4])
    with (
        bounded(),
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)]) as mgr,
        pytest.raises(ckpt.CorruptCheckpointError) as raised,
    ):
        mgr.restore(data={})
    assert victim.name in str(raised.value)
    target: dict[str, object] = {}
    with (
        bounded(),
        caplog.at_level(logging.WARNING),
        ckpt.CheckpointManager(first, tiers=[ckpt.Tier(second)], fallback_to_intact=True) as mgr,
    ):
        info = mgr.restore(data=target)
    assert info is not None and (info.step, info.tier) == (2, 0)
    assert any("step 5 in tier 1" in r.getMessage() for r in caplog.records)


@pytest.mark.s3
def test_leftovers_of_a_killed_copy_on_an_object_store_never_mix_into_the_next(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    first, remote = tmp_path / "t0", f"s3://{bucket}/run"
    save_steps(first, range(2))
    storage = RemoteStorage(remote, options)
    name = tensor_file(first, 1).name
    storage.makedirs("step_000000000001")
    storage.write_file(("step_000000000001", name), lambda f: f.write(b"half a tensor"))
    assert listed(first) == [0, 1]
    with bounded():
        save_steps(first, [2], tiers=[ckpt.Tier(remote, storage_options=options)])
    reader = ckpt.CheckpointReader(remote, storage_options=options)
    assert reader.all_steps() == [0, 1, 2]
    for step in range(3):
        reader.verify(step)
        assert torch.equal(reader.read(step)["data"]["w"], state(step)["w"])


def test_ckpt_copy_skips_a_step_already_there_but_says_when_it_differs(capsys, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_steps(src, range(2))
    save_steps(dst, [1])  # another run's step 1
    before = fingerprint(dst / "step_000000000001")
    code, out, err = run(capsys, "copy", src, dst)
    assert code == 0 and out.split("\n")[0] == "copied step 0"
    assert "step 1" in err and "not the same checkpoint" in err
    assert fingerprint(dst / "step_000000000001") == before
    code, _, err = run(capsys, "copy", f"{src}:0", dst)
    assert code == 0 and "not the same" not in err  # the same bytes: no warning


@pytest.mark.parametrize("kind", ["fifo", "link_outside", "directory"])
def test_ckpt_copy_of_a_step_with_a_hostile_file_fails_naming_it(capsys, tmp_path, kind):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_steps(src, range(2))
    victim = tensor_file(src, 1)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(victim.read_bytes())
    kept = outside.read_bytes()
    victim.unlink()
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "link_outside":
        os.symlink(outside, victim)
    else:
        victim.mkdir()
    code, _, err = run(capsys, "copy", f"{src}:1", dst)
    assert code == 1 and victim.name in err, err
    assert listed(dst) == []
    assert not (dst / "step_000000000001").exists()
    assert outside.read_bytes() == kept


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(float("inf"), None), (-1, None), (0, None), (float("nan"), ValueError), ("x", TypeError)],
)
def test_close_takes_any_timeout_and_always_stops_the_copier(tmp_path, timeout, error):
    first, tier = tmp_path / "t0", tmp_path / "t1"
    mgr = ckpt.CheckpointManager(first, tiers=[ckpt.Tier(tier)])
    mgr.save(0, data=state(0))
    copier = mgr._tiers.copier  # type: ignore[union-attr]
    with bounded():
        if error is None:
            mgr.close(timeout=timeout)
        else:
            with pytest.raises(error, match="timeout"):
                mgr.close(timeout=timeout)
        copier._thread.join()  # stopped: no thread left behind
    with bounded(), ckpt.CheckpointManager(first, tiers=[ckpt.Tier(tier)]) as again:
        again.save(1, data=state(1))  # the locks were released
    assert listed(tier) == [0, 1]


def test_an_interrupted_copy_lists_nothing_and_leaves_no_attempt(capsys, tmp_path, monkeypatch):
    from ckpt.saving import copying

    src, dst = tmp_path / "src", tmp_path / "dst"
    save_steps(src, range(2))
    real = copying.Hasher.update
    calls = []

    def update(self, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, data)

    monkeypatch.setattr(copying.Hasher, "update", update)
    code, _, err = run(capsys, "copy", f"{src}:1", dst)
    assert code == 130 and "interrupted" in err
    monkeypatch.undo()
    assert listed(dst) == []
    assert [p.name for p in dst.iterdir() if not p.name.startswith(".ckpt-writer")] == []
    code, _, _ = run(capsys, "copy", f"{src}:1", dst)
    assert code == 0 and listed(dst) == [1]
