"""Data position: a sampler that resumes mid-epoch at exactly the next index.

Out of scope here, as documented in ``docs/usage.md``: state inside DataLoader
worker processes (their own random streams, iterable datasets' positions) and
indices that workers have prefetched but training has not consumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableSampler", "resumable_loader"]

logger = logging.getLogger(__name__)

_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant that spreads consecutive epochs apart


class ResumableSampler(Sampler[int]):
    """Yields ``0 .. n-1`` once per epoch, shuffled from its own generator, and resumes mid-epoch.

    Each ``iter()`` starts the next epoch, except the first after
    ``load_state_dict``, which yields the rest of the saved epoch, from exactly
    the next index (nothing, if the state was saved after its last index).
    The order never depends on the global random streams, and the sampler
    counts the indices it has yielded, which is the number training consumed
    when the DataLoader has ``num_workers=0`` (torchdata's ``StatefulDataLoader``
    accounts for prefetching workers).

    ``loader_generator`` is for the DataLoader's ``generator=`` argument: torch
    draws one number from it at every ``iter(loader)`` to seed workers. With
    it, that draw no longer advances the global torch stream, and it is the
    same for an epoch whether or not the run was resumed.

    Not thread-safe; one live iterator at a time (a new ``iter()`` ends the previous one).

    Args:
        data_source: The dataset (anything with ``len``) or its length.
        shuffle: Shuffle every epoch; ``False`` yields indices in order.
        seed: Seeds the shuffle; runs with the same seed see the same orders.

    Example:
        >>> sampler = ckpt.ResumableSampler(dataset, seed=0)
        >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler,
        ...                     generator=sampler.loader_generator)
        >>> mgr.restore(model=model, optimizer=opt, sampler=sampler)
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0):
        size = data_source if isinstance(data_source, int) else len(data_source)
        if isinstance(size, bool) or size < 0:
            raise ValueError(f"data_source must have a non-negative length, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self._size = size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self.loader_generator = torch.Generator()
        self._epoch = 0
        self._position = 0
        self._order: list[int] | None = None  # the epoch's order, once drawn
        self._epoch_start_state = self._generator.get_state()
        self._resume = False
        self._live_iterator = 0
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
        """The epoch of the latest index yielded, counting from 0.

        Inside ``for batch in loader:`` it is the batch's epoch (with
        ``num_workers=0``); it moves on when the next epoch's ``iter()`` starts.
        """
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of ``epoch`` have been yielded."""
        return self._position

    def _epoch_done(self) -> bool:
        return self._order is not None and self._position >= self._size

    def _seed_loader_generator(self) -> None:
        # The next iter(loader) draws from it: seed it for the epoch that iter() will yield.
        upcoming = self._epoch + 1 if self._epoch_done() and not self._resume else self._epoch
        self.loader_generator.manual_seed((self.seed ^ (upcoming * _MIX)) % 2**64)

    def _draw_order(self) -> list[int]:
        if self.shuffle:
            return torch.randperm(self._size, generator=self._generator).tolist()
        return list(range(self._size))

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, False
        order = self._order
        if not resume or order is None:
            if order is not None:
                abandoned = not self._epoch_done()
                self._epoch += 1
                self._position = 0
                if abandoned:
                    self._seed_loader_generator()
            self._epoch_start_state = self._generator.get_state()
            order = self._order = self._draw_order()
        self._live_iterator += 1
        return self._indices(self._live_iterator, order)

    def _indices(self, token: int, order: list[int]) -> Iterator[int]:
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
        ``load_state_dict`` can draw the same order again.
        """
        start = self._generator.get_state() if self._order is None else self._epoch_start_state
        return {
            "size": self._size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
            "generator": start.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position: the next ``iter()`` yields the rest of that epoch.

        The rest may be empty (a state saved after the epoch's last index); the
        ``iter()`` after it starts the next epoch.

        Raises:
            ValueError: The state is malformed or was saved for another dataset size
                or shuffle setting; the sampler is unchanged.
        """
        state = state_dict
        expected = {"size", "shuffle", "seed", "epoch", "position", "generator"}
        if not isinstance(state, dict) or set(state) != expected:
            raise ValueError(f"a ResumableSampler state must have exactly the keys {expected}")
        if state["size"] != self._size or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"the sampler state is for {state['size']} indices with shuffle="
                f"{state['shuffle']}, but this sampler has {self._size} with "
                f"shuffle={self.shuffle}"
            )
        epoch, position, generator = state["epoch"], state["position"], state["generator"]
        seed = state["seed"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, position, seed)):
            raise ValueError("the sampler state's epoch, position and seed must be ints")
        if not 0 <= seed < 2**63:
            raise ValueError(f"the sampler state's seed {seed} is out of range")
        if epoch < 0 or not 0 <= position <= self._size:
            raise ValueError(f"the sampler state has epoch {epoch} and position {position}")
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
            raise ValueError("the sampler state's generator must be a uint8 tensor")
        candidate = torch.Generator()
        candidate.set_state(generator.cpu())  # raises on a malformed state before any change

        self._generator = candidate
        self.seed = seed
        self._epoch = epoch
        self._epoch_start_state = self._generator.get_state()
        self._order = self._draw_order()
        self._position = position
        self._resume = True
        self._live_iterator += 1  # iterators from before the load stop
        self._seed_loader_generator()
        logger.debug("sampler resumes epoch %d at index %d of %d", epoch, position, self._size)


def resumable_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> DataLoader[Any]:
    """A ``DataLoader`` wired to a :class:`ResumableSampler` (save ``loader.sampler``).

    Args:
        dataset: A map-style dataset.
        batch_size: As for ``DataLoader``.
        shuffle: Shuffle every epoch, from the sampler's own generator.
        seed: The sampler's seed.
        **kwargs: Other ``DataLoader`` arguments (not ``sampler``, ``batch_sampler``,
            ``shuffle`` or ``generator``, which this sets).

    Example:
        >>> loader = ckpt.resumable_loader(dataset, batch_size=32, seed=0)
        >>> mgr.restore(model=model, optimizer=opt, sampler=loader.sampler)
    """
    clashing = {"sampler", "batch_sampler", "generator"} & kwargs.keys()
    if clashing:
        raise TypeError(f"resumable_loader() sets {sorted(clashing)} itself")
    if not isinstance(dataset, Sized):
        raise TypeError("resumable_loader() needs a map-style dataset with a length")
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=sampler.loader_generator,
        **kwargs,
    )
