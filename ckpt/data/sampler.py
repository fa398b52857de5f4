"""Data position: a sampler that resumes mid-epoch at exactly the next batch, workers or not.

With ``num_workers > 0`` a DataLoader pulls indices from its sampler ahead of
training (up to ``num_workers * prefetch_factor`` batches), so the indices a
sampler has yielded are not the ones training has received. The loader built
by :func:`resumable_loader` counts the batches it hands to the training loop
and tells its sampler, whose position is then the number of indices training
has received. Out of scope, as documented in ``docs/usage.md``: state inside
worker processes (their own random streams after the first batch, iterable
datasets' positions).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from ckpt.data.sampler_state import LIMIT, check_for, share

__all__ = ["ResumableSampler"]

logger = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant that spreads consecutive epochs apart
_RANK_MIX = 0xD1B54A32D192ED03  # another, for the ranks' loader generators


class ResumableSampler(Sampler[int]):
    """Yields ``0 .. n-1`` once per epoch, shuffled from its own generator, and resumes mid-epoch.

    Each ``iter()`` starts the next epoch, except the first after
    ``load_state_dict``, which yields the rest of the saved epoch, from exactly
    the next index (nothing, if the state was saved after its last index). An
    ``iter()`` whose iterator was never advanced is replaced by the next one, not
    counted as an epoch. The order never depends on the global random streams.

    Across ranks it splits each epoch as ``torch.utils.data.DistributedSampler``
    does: every rank draws the same order from the same seed, pads it by
    wrapping around to a multiple of ``num_replicas`` (or, with ``drop_last``,
    drops the uneven tail) and takes ``order[rank::num_replicas]``. A state
    saved on any rank loads on any rank; loaded into another ``num_replicas``
    mid-epoch, the rest of that epoch is split over the new ranks, so each of its
    remaining indices is yielded once across them (plus padding as above).

    ``position`` counts the indices of the epoch's order the training loop has
    received, across all ranks (which run in step): under a
    :class:`ResumableDataLoader` (what :func:`resumable_loader` builds), the
    batches the loader has handed out, whatever its workers prefetched; under
    any other loader, the indices yielded, which is the same thing only with
    ``num_workers=0`` (torchdata's ``StatefulDataLoader`` does its own accounting).

    ``loader_generator`` is for the DataLoader's ``generator=`` argument: torch
    draws one number from it at every ``iter(loader)`` to seed workers. With
    it, that draw no longer advances the global torch stream, and it is the
    same for an epoch whether or not the run was resumed (with persistent
    workers, drawn once per process, it is the same in every process). It also
    depends on the rank, so ranks' workers do not share random streams.

    Not thread-safe; one live iterator at a time (a new ``iter()`` ends the
    previous one). ``copy.deepcopy`` gives an independent sampler, also while a
    loader's workers are running.

    Args:
        data_source: The dataset (anything with ``len``) or its length.
        shuffle: Shuffle every epoch; ``False`` yields indices in order.
        seed: Seeds the shuffle; runs with the same seed see the same orders.
        num_replicas: The number of ranks sharing each epoch; by default the
            world size of the initialized default process group, else 1.
        rank: This rank, in ``[0, num_replicas)``; by default the default
            process group's rank, else 0.
        drop_last: Drop the tail of an epoch that does not split evenly over the
            ranks, instead of padding it with indices from its start.

    Raises:
        ValueError: An argument is out of range.

    Example:
        >>> loader = ckpt.resumable_loader(dataset, batch_size=32, seed=0, num_workers=4)
        >>> mgr.restore(model=model, optimizer=opt, sampler=loader.sampler)
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ):
        size = data_source if isinstance(data_source, int) else len(data_source)
        if isinstance(size, bool) or size < 0:
            raise ValueError(f"data_source must have a non-negative length, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self._size = size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self._num_replicas, self._rank = _replicas_and_rank(num_replicas, rank)
        self._drop_last = bool(drop_last)
        self._generator = torch.Generator().manual_seed(seed)
        self.loader_generator = torch.Generator()
        self._epoch = 0
        self._split_start = 0  # where in the epoch's order the current split over the ranks starts
        self._position = 0  # indices of the split this rank yielded
        self._consumed = 0  # indices of the split this rank's training loop received (when counted)
        self._order: list[int] | None = None  # the epoch's order, once drawn
        self._epoch_start_state = self._generator.get_state()
        self._resume = False
        self._live_iterator = 0
        self._started = True  # whether the latest iterator has been advanced
        self._counted = False  # a ResumableDataLoader reports consumed batches
        self._batch_size: int | None = None
        self._loader_drop_last: bool | None = None
        self._persistent = False
        self._seed_loader_generator()

    def __len__(self) -> int:
        """This rank's share of an epoch (of the dataset size, with one rank)."""
        return share(self._size, self._num_replicas, self._drop_last)

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(size={self._size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"num_replicas={self._num_replicas}, rank={self._rank}, epoch={self.epoch}, "
            f"position={self.position})"
        )

    @property
    def size(self) -> int:
        """The dataset's length: the number of indices in an epoch, across all ranks."""
        return self._size

    @property
    def num_replicas(self) -> int:
        """The number of ranks that share each epoch."""
        return self._num_replicas

    @property
    def rank(self) -> int:
        """This sampler's rank."""
        return self._rank

    @property
    def drop_last(self) -> bool:
        """Whether an epoch's tail that does not split evenly over the ranks is dropped."""
        return self._drop_last

    @property
    def epoch(self) -> int:
        """The epoch of the batches being trained on, counting from 0.

        Inside ``for batch in loader:`` it is the batch's epoch; it moves on
        when the next epoch's ``iter()`` starts.
        """
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of ``epoch`` the training loop has received, on all ranks together.

        The dataset size once this rank's share of the epoch is exhausted
        (padding or dropped tail included); see the class doc.
        """
        return self._global(self._consumed if self._counted else self._position)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield ``epoch``, as ``DistributedSampler.set_epoch`` does.

        Epoch ``e``'s order is the same whether reached by iterating or by
        ``set_epoch(e)``. Naming the epoch the next ``iter()`` yields anyway changes
        nothing: the epoch after a finished one, the current one before it is
        iterated, or the rest of a restored epoch (so ``set_epoch(epoch)`` at the top
        of a resumed loop keeps its place). Any other epoch starts afresh at its
        first index (a restored position is dropped); reaching it replays the
        shuffles of the epochs before it.

        Raises:
            ValueError: ``epoch`` is not a non-negative int.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        upcoming = self._epoch
        if self._order is not None and self._started and not self._resume:
            upcoming += 1  # the last iterator ran: the next iter() starts the next epoch
        if epoch == upcoming:
            return
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch if self.shuffle else 0):  # draw the orders of the epochs before
            torch.randperm(self._size, generator=generator)
        self._generator = generator
        self._epoch, self._order, self._resume, self._started = epoch, None, False, True
        self._split_start = self._position = self._consumed = 0
        self._epoch_start_state = generator.get_state()
        self._live_iterator += 1  # an iterator of the epoch left behind stops
        self._seed_loader_generator()

    def attach(
        self, *, batch_size: int | None, drop_last: bool, persistent_workers: bool = False
    ) -> None:
        """Let a loader report consumed batches: ``position`` then counts what training received.

        Called by :class:`ResumableDataLoader`; the batch layout is saved with
        the position and checked on load.
        """
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
        self._counted = True
        self._batch_size = batch_size
        self._loader_drop_last = bool(drop_last)
        self._persistent = bool(persistent_workers)
        self._seed_loader_generator()

    def consumed(self, indices: int) -> None:
        """Record that the training loop received a batch of ``indices`` indices of this epoch."""
        self._consumed = min(self._consumed + indices, self._split_length())

    def _split_length(self) -> int:
        """This rank's share of the current split (the epoch's order from ``split_start``)."""
        return share(self._size - self._split_start, self._num_replicas, self._drop_last)

    def _global(self, taken: int) -> int:
        """The epoch's entries consumed on all ranks once each has taken ``taken`` of the split."""
        if taken >= self._split_length():
            return self._size
        return self._split_start + taken * self._num_replicas

    def _epoch_done(self) -> bool:
        return self._order is not None and self._position >= self._split_length()

    def _seed_loader_generator(self) -> None:
        # The next iter(loader) draws from it: seed it for the epoch that iter() will yield.
        # Persistent workers draw once per process: the same seed in every process.
        upcoming = self._epoch + 1 if self._epoch_done() and not self._resume else self._epoch
        if self._persistent:
            upcoming = 0
        mixed = self.seed ^ (upcoming * _MIX) ^ (self._rank * _RANK_MIX)  # rank 0: as one process
        self.loader_generator.manual_seed(mixed % 2**64)

    def _draw_order(self) -> list[int]:
        if self.shuffle:
            return torch.randperm(self._size, generator=self._generator).tolist()
        return list(range(self._size))

    def __iter__(self) -> Iterator[int]:
        if not self._started:  # the previous iterator never ran: this one takes its place
            self._live_iterator += 1
            return self._indices(self._live_iterator, self._order or [])
        resume, self._resume = self._resume, False
        order = self._order
        if not resume or order is None:
            if order is not None:
                abandoned = not self._epoch_done()
                self._epoch += 1
                self._split_start = self._position = self._consumed = 0
                if abandoned:
                    self._seed_loader_generator()
            self._epoch_start_state = self._generator.get_state()
            order = self._order = self._draw_order()
        self._live_iterator += 1
        self._started = False
        return self._indices(self._live_iterator, order)

    def _indices(self, token: int, order: list[int]) -> Iterator[int]:
        if token == self._live_iterator:
            self._started = True
        start, replicas, rank = self._split_start, self._num_replicas, self._rank
        remaining, length = self._size - start, self._split_length()
        while True:
            if token != self._live_iterator:
                raise RuntimeError("this sampler iterator was superseded by a newer iter()")
            if self._position >= length:  # a resumed epoch that had nothing left
                self._seed_loader_generator()
                return
            # DistributedSampler pads by wrapping around: entry i of the split is remaining[i % n]
            index = order[start + (self._position * replicas + rank) % remaining]
            self._position += 1
            if self._position == length:
                self._seed_loader_generator()
            yield index

    def state_dict(self) -> dict[str, Any]:
        """Return where the sampler is: its epoch, the position in it, and its generator.

        The generator state is the one the epoch's order was drawn from, so that
        ``load_state_dict`` can draw the same order again. ``batch_size`` and
        ``drop_last`` are the loader's batch layout (``None`` when no
        :class:`ResumableDataLoader` reports to this sampler). With more than one
        rank, or after a change of ``num_replicas`` mid-epoch, the state also
        records ``num_replicas``, ``rank``, ``split_start`` (where in the epoch's
        order the current split over the ranks starts) and ``sampler_drop_last``.
        """
        start = self._generator.get_state() if self._order is None else self._epoch_start_state
        state: dict[str, Any] = {
            "size": self._size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self.position,
            "generator": start.clone(),
            "batch_size": self._batch_size,
            "drop_last": self._loader_drop_last,
        }
        if self._num_replicas != 1 or self._split_start != 0:
            state["num_replicas"] = self._num_replicas
            state["rank"] = self._rank
            state["split_start"] = self._split_start
            state["sampler_drop_last"] = self._drop_last
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position: the next ``iter()`` yields the rest of that epoch.

        The rest may be empty (a state saved after the epoch's last index); the
        ``iter()`` after it starts the next epoch. A state saved by any rank
        will do. Saved with this ``num_replicas`` and ``drop_last``, the ranks
        continue exactly where they were; otherwise the rest of the epoch is
        split over this sampler's ranks afresh. Every field is checked before
        anything changes. States saved before the batch layout or the ranks were
        recorded load too.

        Raises:
            ValueError: The state is malformed, or was saved for another dataset
                size, shuffle setting or batch layout; the message names the field
                and the sampler is unchanged.
        """
        state = check_for(state_dict, self._size, self.shuffle)
        layout = (state["batch_size"], state["drop_last"])
        if (
            self._counted
            and layout[1] is not None
            and layout != (self._batch_size, self._loader_drop_last)
        ):
            raise ValueError(
                f"the sampler state is for batches of {layout[0]} with drop_last={layout[1]}, "
                f"but this loader has batch_size={self._batch_size}, "
                f"drop_last={self._loader_drop_last}"
            )
        candidate = torch.Generator()
        try:
            candidate.set_state(state["generator"])
        except RuntimeError as e:
            raise ValueError(f"the sampler state's 'generator' is not a valid state: {e}") from e

        self._generator = candidate
        self.seed = state["seed"]
        self._epoch = state["epoch"]
        self._epoch_start_state = self._generator.get_state()
        self._order = self._draw_order()
        self._continue_split(state)
        self._resume = True
        self._started = True
        self._live_iterator += 1  # iterators from before the load stop
        self._seed_loader_generator()
        logger.debug(
            "sampler resumes epoch %d at index %d of %d (rank %d of %d, split from %d)",
            self._epoch,
            state["position"],
            self._size,
            self._rank,
            self._num_replicas,
            self._split_start,
        )

    def _continue_split(self, state: Mapping[str, Any]) -> None:
        """Take up the saved split, or split the rest of the epoch over this sampler's ranks."""
        position = state["position"]
        same = state["num_replicas"] == self._num_replicas and (
            self._num_replicas == 1 or state["sampler_drop_last"] == self._drop_last
        )
        self._split_start = state["split_start"] if same else position
        if position == self._size:
            taken = self._split_length()
        else:
            taken = (position - self._split_start) // self._num_replicas
        self._position = self._consumed = taken


def _replicas_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """The arguments, or the default process group's world size and rank, else 1 and 0."""
    if num_replicas is None or rank is None:
        dist = sys.modules.get("torch.distributed")  # loaded by whoever initialized a group
        grouped = dist is not None and dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = int(dist.get_world_size()) if grouped and dist else 1
        if rank is None:
            rank = int(dist.get_rank()) if grouped and dist else 0
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be an int in [0, num_replicas={num_replicas}), got {rank!r}")
    return num_replicas, rank
