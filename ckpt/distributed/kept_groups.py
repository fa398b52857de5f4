"""The gloo groups ckpt closed without destroying them: kept for reuse, or until exit.

Destroying a gloo group joins its threads (about 20 ms on 2 CPU ranks), and a group
left to the garbage collector may be destroyed in a forked DataLoader worker, which
crashes it. So :meth:`RankGroup.close <ckpt.distributed.group.RankGroup.close>`
hands a healthy group here: a group of some of the ranks waits for the next
``RankGroup`` over the same ranks (torch may give a destroyed group's name again,
with its rendezvous keys still in the store); a group of every rank is kept alive,
unused, among the last :data:`KEPT_GROUPS`. The process that kept them destroys them
at exit, never a forked child.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections import deque

import torch.distributed as dist

__all__ = ["KEPT_GROUPS", "destroy", "keep", "take_idle"]

logger = logging.getLogger(__name__)

IdleKey = tuple[tuple[int, ...], float]
"""The ranks of a group and its timeout."""


def keep(group: dist.ProcessGroup, idle_key: IdleKey | None) -> None:
    """Keep a closed, healthy group: for reuse over ``idle_key``'s ranks, or until exit."""
    _KEEPER[0] = os.getpid()
    if idle_key is not None:
        _IDLE.setdefault(idle_key, []).append(group)
        return
    _KEPT.append(group)
    if len(_KEPT) > KEPT_GROUPS:
        destroy(_KEPT.popleft())


_IDLE: dict[IdleKey, list[dist.ProcessGroup]] = {}
"""Closed gloo groups of some of the ranks, by (ranks, timeout), kept for reuse."""


KEPT_GROUPS = 8
"""Closed gloo groups of every rank kept alive (not destroyed at close), at most."""

_KEPT: deque[dist.ProcessGroup] = deque()
"""Closed gloo groups of every rank, oldest first: never reused, destroyed beyond
:data:`KEPT_GROUPS` (held here so that no garbage collection, say in a forked DataLoader
worker, ever destroys one)."""


_KEEPER = [0]
"""The pid that kept the groups of :data:`_KEPT` and :data:`_IDLE` (a forked child
inherits them, unusable: it must never destroy them)."""


@atexit.register
def _let_go_at_exit() -> None:
    """Destroy the kept gloo groups at exit, while the interpreter is whole (not in a fork).

    Left to the interpreter's finalization, about one exit in eight of a 2-rank FSDP2
    job aborted there ("terminate called without an active exception", SIGABRT: a
    failed job for torchrun) after every save had succeeded.
    """
    if os.getpid() != _KEEPER[0]:
        return
    while _KEPT:
        destroy(_KEPT.popleft())
    for groups in _IDLE.values():
        while groups:
            destroy(groups.pop())
    _IDLE.clear()


def destroy(group: dist.ProcessGroup) -> None:
    """Destroy a gloo group of ckpt's (nothing if the default group took it down first)."""
    try:
        dist.destroy_process_group(group)
    except (ValueError, RuntimeError) as e:  # the default group was destroyed first
        logger.debug("ckpt gloo group already gone: %s", e)


def take_idle(key: IdleKey | None) -> dist.ProcessGroup | None:
    """A kept gloo group over ``key``'s ranks that is still alive, or ``None``."""
    idle = _IDLE.get(key, []) if key is not None else []
    while idle:
        group = idle.pop()
        try:
            dist.get_process_group_ranks(group)  # raises once the default group was destroyed
        except (KeyError, ValueError, RuntimeError):
            continue
        return group
    return None
