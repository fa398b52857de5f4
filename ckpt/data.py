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
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableDataLoader", "ResumableSampler", "resumable_loader"]

logger = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant that spreads consecutive epochs apart
_LIMIT = 2**63
_KEYS = frozenset({"size", "shuffle", "seed", "epoch", "position", "generator"})
_LAYOUT_KEYS = frozenset({"batch_size", "drop_last"})
_GENERATOR_BYTES = torch.Generator().get_state().numel()


class ResumableSampler(Sampler[int]):
    """Yields ``0 .. n-1`` once per epoch, shuffled from its own generator, and resumes mid-epoch.

    Each ``iter()`` starts the next epoch, except the first after
    ``load_state_dict``, which yields the rest of the saved epoch, from exactly
    the next index (nothing, if the state was saved after its last index). An
    ``iter()`` whose iterator was never advanced is replaced by the next one, not
    counted as an epoch. The order never depends on the global random streams.

    ``position`` counts the indices the training loop has received: under a
    :class:`ResumableDataLoader` (what :func:`resumable_loader` builds), the
    batches the loader has handed out, whatever its workers prefetched; under
    any other loader, the indices yielded, which is the same thing only with
    ``num_workers=0`` (torchdata's ``StatefulDataLoader`` does its own accounting).

    ``loader_generator`` is for the DataLoader's ``generator=`` argument: torch
    draws one number from it at every ``iter(loader)`` to seed workers. With
    it, that draw no longer advances the global torch stream, and it is the
    same for an epoch whether or not the run was resumed (with persistent
    workers, drawn once per process, it is the same in every process).

    Not thread-safe; one live iterator at a time (a new ``iter()`` ends the
    previous one). ``copy.deepcopy`` gives an independent sampler, also while a
    loader's workers are running.

    Args:
        data_source: The dataset (anything with ``len``) or its length.
        shuffle: Shuffle every epoch; ``False`` yields indices in order.
        seed: Seeds the shuffle; runs with the same seed see the same orders.

    Example:
        >>> loader = ckpt.resumable_loader(dataset, batch_size=32, seed=0, num_workers=4)
        >>> mgr.restore(model=model, optimizer=opt, sampler=loader.sampler)
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0):
        size = data_source if isinstance(data_source, int) else len(data_source)
        if isinstance(size, bool) or size < 0:
            raise ValueError(f"data_source must have a non-negative length, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self._size = size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.loader_generator = torch.Generator()
        self._epoch = 0
        self._position = 0  # indices of the epoch yielded
        self._consumed = 0  # indices of the epoch the training loop received (when counted)
        self._order: list[int] | None = None  # the epoch's order, once drawn
        self._epoch_start_state = self._generator.get_state()
        self._resume = False
        self._live_iterator = 0
        self._started = True  # whether the latest iterator has been advanced
        self._counted = False  # a ResumableDataLoader reports consumed batches
        self._batch_size: int | None = None
        self._drop_last: bool | None = None
        self._persistent = False
        self._seed_loader_generator()

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(size={self._size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self.epoch}, position={self.position})"
        )

    @property
    def epoch(self) -> int:
        """The epoch of the batches being trained on, counting from 0.

        Inside ``for batch in loader:`` it is the batch's epoch; it moves on
        when the next epoch's ``iter()`` starts.
        """
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of ``epoch`` the training loop has received (see the class doc)."""
        return self._consumed if self._counted else self._position

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
        self._drop_last = bool(drop_last)
        self._persistent = bool(persistent_workers)
        self._seed_loader_generator()

    def consumed(self, indices: int) -> None:
        """Record that the training loop received a batch of ``indices`` indices of this epoch."""
        self._consumed = min(self._consumed + indices, self._size)

    def _epoch_done(self) -> bool:
        return self._order is not None and self._position >= self._size

    def _seed_loader_generator(self) -> None:
        # The next iter(loader) draws from it: seed it for the epoch that iter() will yield.
        # Persistent workers draw once per process: the same seed in every process.
        upcoming = self._epoch + 1 if self._epoch_done() and not self._resume else self._epoch
        if self._persistent:
            upcoming = 0
        self.loader_generator.manual_seed((self.seed ^ (upcoming * _MIX)) % 2**64)

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
                self._position = self._consumed = 0
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
        while True:
            if token != self._live_iterator:
                raise RuntimeError("this sampler iterator was superseded by a newer iter()")
            if self._position >= self._size:  # a resumed epoch that had nothing left
                self._seed_loader_generator()
                return
            index = order[self._position]
            self._position += 1
            if self._position == self._size:
                self._seed_loader_generator()
            yield index

    def state_dict(self) -> dict[str, Any]:
        """Return where the sampler is: its epoch, the position in it, and its generator.

        The generator state is the one the epoch's order was drawn from, so that
        ``load_state_dict`` can draw the same order again. ``batch_size`` and
        ``drop_last`` are the loader's batch layout (``None`` when no
        :class:`ResumableDataLoader` reports to this sampler).
        """
        start = self._generator.get_state() if self._order is None else self._epoch_start_state
        return {
            "size": self._size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self.position,
            "generator": start.clone(),
            "batch_size": self._batch_size,
            "drop_last": self._drop_last,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position: the next ``iter()`` yields the rest of that epoch.

        The rest may be empty (a state saved after the epoch's last index); the
        ``iter()`` after it starts the next epoch. Every field is checked before
        anything changes. States saved before the batch layout was recorded load too.

        Raises:
            ValueError: The state is malformed, or was saved for another dataset
                size, shuffle setting or batch layout; the message names the field
                and the sampler is unchanged.
        """
        state = _checked_state(state_dict, self._size, self.shuffle)
        layout = (state["batch_size"], state["drop_last"])
        if (
            self._counted
            and layout[1] is not None
            and layout != (self._batch_size, self._drop_last)
        ):
            raise ValueError(
                f"the sampler state is for batches of {layout[0]} with drop_last={layout[1]}, "
                f"but this loader has batch_size={self._batch_size}, drop_last={self._drop_last}"
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
        self._position = self._consumed = state["position"]
        self._resume = True
        self._started = True
        self._live_iterator += 1  # iterators from before the load stop
        self._seed_loader_generator()
        logger.debug(
            "sampler resumes epoch %d at index %d of %d", self._epoch, self._position, self._size
        )


def _checked_state(state: object, size: int, shuffle: bool) -> dict[str, Any]:
    """Check every field of a sampler state; return it with the batch layout filled in.

    Raises:
        ValueError: Naming the first field that is wrong.
    """
    if not isinstance(state, Mapping) or set(state) not in (_KEYS, _KEYS | _LAYOUT_KEYS):
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"a ResumableSampler state must have exactly the keys {sorted(_KEYS | _LAYOUT_KEYS)}"
            f", got {keys}"
        )
    out = {"batch_size": None, "drop_last": None, **state}
    for key in ("size", "seed", "epoch", "position"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"the sampler state's size, seed, epoch and position must be ints; {key!r} is "
                f"{value!r}"
            )
        if not 0 <= value < _LIMIT:
            raise ValueError(f"the sampler state's {key!r} is out of range: {key} {value}")
    if not isinstance(out["shuffle"], bool):
        raise ValueError(f"the sampler state's 'shuffle' must be a bool, got {out['shuffle']!r}")
    if out["size"] != size or out["shuffle"] != shuffle:
        raise ValueError(
            f"the sampler state ('size', 'shuffle') is for {out['size']} indices with shuffle="
            f"{out['shuffle']}, but this sampler has {size} with shuffle={shuffle}"
        )
    if out["position"] > size:
        raise ValueError(
            f"the sampler state's 'position' is out of range: position {out['position']} > "
            f"size {size}"
        )
    batch_size, drop_last = out["batch_size"], out["drop_last"]
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size < _LIMIT
    ):
        raise ValueError(
            f"the sampler state's 'batch_size' must be a positive int, got {batch_size!r}"
        )
    if not (drop_last is None or isinstance(drop_last, bool)):
        raise ValueError(f"the sampler state's 'drop_last' must be a bool, got {drop_last!r}")
    generator = out["generator"]
    if not (
        isinstance(generator, torch.Tensor)
        and generator.dtype == torch.uint8
        and generator.device.type == "cpu"
        and generator.shape == (_GENERATOR_BYTES,)
    ):
        raise ValueError(
            f"the sampler state's 'generator' must be a CPU uint8 tensor of {_GENERATOR_BYTES} "
            "bytes (a torch.Generator state)"
        )
    return out


class ResumableDataLoader(DataLoader[Any]):
    """A ``DataLoader`` whose :class:`ResumableSampler` counts the batches training received.

    Build it with :func:`resumable_loader`. Every iterator it returns tells the
    sampler about each batch as it is handed out, so the sampler's saved
    position is exact with any ``num_workers``, ``prefetch_factor``,
    ``persistent_workers`` and ``drop_last``. Iterators delegate everything
    else (attributes such as ``_base_seed``) to torch's own iterator.
    """

    sampler: ResumableSampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        per_batch = 1 if self.batch_size is None else self.batch_size
        return _CountingIterator(super().__iter__(), self.sampler, per_batch)


class _CountingIterator:
    """Wraps a DataLoader iterator; reports each batch it returns to the sampler."""

    def __init__(self, inner: Iterator[Any], sampler: ResumableSampler, per_batch: int):
        self._inner = inner
        self._sampler = sampler
        self._per_batch = per_batch

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._inner)
        self._sampler.consumed(self._per_batch)
        return batch

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def resumable_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int | None = 1,
    shuffle: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> ResumableDataLoader:
    """A ``DataLoader`` wired to a :class:`ResumableSampler` (save ``loader.sampler``).

    The position saved is exact with workers too: it counts the batches handed
    to the training loop, not the indices workers prefetched.

    Args:
        dataset: A map-style dataset.
        batch_size: As for ``DataLoader``.
        shuffle: Shuffle every epoch, from the sampler's own generator.
        seed: The sampler's seed.
        **kwargs: Other ``DataLoader`` arguments (``num_workers``,
            ``persistent_workers``, ``prefetch_factor``, ``drop_last``, ...; not
            ``sampler``, ``batch_sampler`` or ``generator``, which this sets, nor
            ``in_order=False``, whose batches arrive out of order).

    Example:
        >>> loader = ckpt.resumable_loader(dataset, batch_size=32, seed=0, num_workers=4)
        >>> mgr.restore(model=model, optimizer=opt, sampler=loader.sampler)
    """
    clashing = {"sampler", "batch_sampler", "generator"} & kwargs.keys()
    if clashing:
        raise TypeError(f"resumable_loader() sets {sorted(clashing)} itself")
    if kwargs.get("in_order", True) is not True:
        raise ValueError("resumable_loader() needs in_order=True: a position must be a prefix")
    if not isinstance(dataset, Sized):
        raise TypeError("resumable_loader() needs a map-style dataset with a length")
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    loader = ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=sampler.loader_generator,
        **kwargs,
    )
    sampler.attach(
        batch_size=batch_size,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers,
    )
    return loader
