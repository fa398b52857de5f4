"""A DataLoader that tells its :class:`ResumableSampler` the batches training received.

With ``num_workers > 0`` a DataLoader pulls indices from its sampler ahead of
training, so the indices a sampler has yielded are not the ones training has
received. :func:`resumable_loader` builds a loader that counts the batches it
hands to the training loop and tells its sampler (see :mod:`ckpt.data.sampler`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, Dataset

from ckpt.data.sampler import ResumableSampler

__all__ = ["ResumableDataLoader", "resumable_loader"]


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
    num_replicas: int | None = None,
    rank: int | None = None,
    sampler_drop_last: bool = False,
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
        num_replicas: The number of ranks sharing each epoch (default: the
            default process group's world size, else 1).
        rank: This rank (default: the default process group's rank, else 0).
        sampler_drop_last: The sampler's ``drop_last``: drop an epoch's tail that
            does not split evenly over the ranks instead of padding it
            (``drop_last`` is the DataLoader's, for the last batch).
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
    sampler = ResumableSampler(
        dataset,
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=sampler_drop_last,
    )
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
