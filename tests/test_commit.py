"""Commit and cleanup helpers: only ckpt's own leftovers are removed, failures only logged."""

from __future__ import annotations

import logging
import os
import socket

import torch

import ckpt
from ckpt.format import temp_dir_name
from ckpt.saving.commit import (
    delete_checkpoint,
    pid_alive,
    remove_abandoned_temps,
    writer_is_gone,
)
from ckpt.storage import Storage


def test_writer_is_gone_only_for_a_dead_process_on_this_host():
    here = socket.gethostname()
    assert not writer_is_gone(f"host {here} pid {os.getpid()} since now")
    assert writer_is_gone(f"host {here} pid 999999999 since now")
    assert not writer_is_gone("host elsewhere pid 999999999 since now")
    assert not writer_is_gone("garbage")
    assert pid_alive(os.getpid()) and not pid_alive(999999999)


def test_abandoned_temps_of_dead_writers_go_and_others_stay(tmp_path):
    storage = Storage(str(tmp_path))
    dead = temp_dir_name(1, socket.gethostname(), 999999999, "abcd1234")
    live = temp_dir_name(2, socket.gethostname(), os.getpid(), "abcd1234")
    remote = temp_dir_name(3, "otherhost", 1, "abcd1234")
    for name in (dead, live, remote, "notes"):
        (tmp_path / name).mkdir()
    remove_abandoned_temps(storage)
    assert sorted(os.listdir(tmp_path)) == sorted([live, remote, "notes"])


def test_a_failed_delete_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    mgr = ckpt.CheckpointManager(tmp_path)
    mgr.save(1, data={"t": torch.ones(1)})
    storage = Storage(str(tmp_path))

    def refuse(*parts):
        raise PermissionError("read-only")

    monkeypatch.setattr(storage, "remove_file", refuse)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        delete_checkpoint(storage, 1, "test")
    assert "could not delete old checkpoint" in caplog.text
    assert mgr.all_steps() == [1]
    mgr.close()
