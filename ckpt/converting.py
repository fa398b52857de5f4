"""The public face of :mod:`ckpt.convert`: ``export``, ``import_checkpoint`` and ``ImportReport``.

``import ckpt`` loads this module only: the converters (and the restricted
unpicklers that read other tools' files) are imported on the first call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["ImportReport", "export", "import_checkpoint"]


@dataclass(frozen=True)
class ImportReport:
    """What an import did.

    Attributes:
        source: The source path.
        layout: The layout recognised (``torch.save``, ``state dict``, ``lightning``,
            ``hf-trainer``, ``accelerate``, ``dcp``, ``safetensors``).
        directory: The ckpt root written to.
        step: The step written.
        epoch: The epoch recorded, if any.
        items: ``{item name: kind}`` written (``model``: module, ...).
        mapped: ``{source key: item or field it became}``.
        extra: Source keys kept as plain data under the ``extra`` dict item.
        dropped: ``{source key: why it was not imported}``.
        notes: Guesses made and hints for the restore.
    """

    source: str
    layout: str
    directory: str
    step: int
    epoch: int | None
    items: dict[str, str]
    mapped: dict[str, str]
    extra: tuple[str, ...]
    dropped: dict[str, str]
    notes: tuple[str, ...]

    def summary(self) -> str:
        """A human-readable account, one fact per line."""
        lines = [
            f"imported {self.source} ({self.layout}) as step {self.step} of {self.directory}",
            "items: " + ", ".join(f"{n} ({k})" for n, k in self.items.items()),
        ]
        lines += [f"  {key} -> {to}" for key, to in self.mapped.items()]
        if self.extra:
            from ckpt.convert.layouts import EXTRA_ITEM  # noqa: PLC0415 - the converters, lazily

            lines.append(f"kept under {EXTRA_ITEM!r}: " + ", ".join(self.extra))
        lines += [f"NOT imported: {key}: {why}" for key, why in self.dropped.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def import_checkpoint(
    src: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    format: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> ImportReport:
    """Convert another tool's checkpoint into a committed ckpt checkpoint.

    Args:
        src: A ``torch.save``/Lightning file, a safetensors file, or a Hugging Face
            Trainer, Accelerate ``save_state`` or DCP checkpoint directory (local).
        directory: The ckpt root to write (path or fsspec URL).
        step: The step to write; else the source's ``global_step``/``step``, else
            its epoch, else 0.
        format: One of :data:`~ckpt.convert.importing.FORMATS`.
        storage_options: Passed to fsspec for ``directory``.

    Returns:
        The report; its unmapped parts are also logged as warnings.

    Raises:
        CheckpointNotFoundError: ``src`` does not exist.
        CorruptCheckpointError: ``src`` cannot be loaded without running code
            (``weights_only`` refused it; the message names the global), is
            malformed, passes a bound of :mod:`ckpt.convert.guard` or
            :mod:`ckpt.convert.dcp`, is a link out of the source or a special file,
            or its tensors would be written larger than
            :data:`~ckpt.convert.importing.MAX_AMPLIFICATION` times its bytes on disk plus
            :data:`~ckpt.convert.importing.AMPLIFICATION_SLACK`. Nothing is
            written then: no step, no temp directory, no root.
        CheckpointExistsError: ``directory`` already has the step.
        CheckpointError: Nothing in ``src`` could be imported.
        ValueError: A bad ``format`` or ``step``.

    Example:
        >>> report = ckpt.import_checkpoint("old/epoch_10.pt", "runs/exp1")
        >>> print(report.summary())
    """
    from ckpt.convert.importing import import_checkpoint as run  # noqa: PLC0415

    return run(src, directory, step=step, format=format, storage_options=storage_options)


def export(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    step: int | None = None,
    item: str = "model",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    format: str = "safetensors",
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    strip_prefixes: bool = True,
) -> list[str]:
    """Write one module item's weights for inference tools.

    Args:
        directory: The checkpoint root (path or fsspec URL).
        out: A local directory to write into (created if missing); files of the
            same names are replaced.
        step: The step to export; the latest committed one when ``None``.
        item: The item holding the weights (a module, or a dict of tensors).
        dtype: Cast floating-point tensors to ``"bf16"``, ``"fp16"`` or ``"fp32"``
            (or a ``torch.dtype``); others are written as stored.
        max_shard_size: The most data bytes per safetensors file (``"5GB"``,
            ``"500MiB"``, an int); more makes shards plus an index.
        format: ``"safetensors"`` (streamed) or ``"pt"`` (``pytorch_model.bin``, a
            plain ``torch.save`` state dict, built whole in memory).
        progress: Show a tqdm bar (needs the ``progress`` extra).
        storage_options: Passed to fsspec for ``directory``.
        strip_prefixes: Remove ``_orig_mod.`` (``torch.compile``) components and a
            ``module.`` prefix on every key (``DataParallel``/DDP), so the bare
            model loads the weights.

    Returns:
        The paths of the files written, the index last.

    Raises:
        CheckpointNotFoundError: No such checkpoint, step or item.
        IncompatibleCheckpointError: The item is not a flat mapping of names to tensors.
        CorruptCheckpointError: A file read fails its checks; nothing is left in ``out``.
        CheckpointWriteError: Writing ``out`` failed, or ``out`` lies inside the
            checkpoint read or inside any checkpoint root (refused before writing).
        ValueError: A bad ``dtype``, ``max_shard_size`` or ``format``.

    Example:
        >>> ckpt.export("runs/exp1", "hf/", item="model", dtype="bf16")
        ['hf/model.safetensors']
    """
    from ckpt.convert.export import export as run  # noqa: PLC0415

    return run(
        directory,
        out,
        step=step,
        item=item,
        dtype=dtype,
        max_shard_size=max_shard_size,
        format=format,
        progress=progress,
        storage_options=storage_options,
        strip_prefixes=strip_prefixes,
    )
