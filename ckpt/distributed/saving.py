"""The collective save: every rank writes its part, the ranks agree, one rank commits.

1. The coordinator (rank 0) takes the root's writer lock, checks the step, removes
   leftovers of crashed saves and opens the uncommitted checkpoint (a temporary
   directory on local disk, attempt-unique file names on object stores); the
   ranks learn its name and token.
2. Every rank captures its state; the ranks agree that all succeeded.
3. DCP's planner decides who writes which shard (replicated tensors spread over
   the ranks); every rank writes its files; the ranks agree again, each
   reporting its files, shards and own items.
4. The coordinator writes the v3 manifest and commits (rename, or the manifest
   itself on object stores), then tells every rank the outcome.

With node-local roots (``CollectiveSave.node_local``, ``docs/tiers.md``) every rank
opens the attempt in its own root in step 1 and, after step 4, commits the
coordinator's manifest there (its own files only).

Any failure before the commit: nothing is committed, the coordinator removes
the attempt, and every rank raises :class:`~ckpt.CheckpointWriteError` naming
the failed ranks; a ``TypeError`` or ``ValueError`` capturing a rank's state (a
value that cannot be stored) is raised as such on every rank, as one process
raises it. Ranks whose ``save`` calls differ (step, epoch, items or their kinds,
metrics, overwrite) all raise :class:`~ckpt.RankMismatchError` before anything is
written. A rank that dies makes the others' collectives fail within
the group's timeout (:class:`~ckpt.CollectiveError`), never hang.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from ckpt.distributed.capture import (
    RankCapture,
    capture_local,
    capture_own,
    lay_out,
)
from ckpt.distributed.group import RankGroup, describe_failure
from ckpt.distributed.save_calls import refuse_different_calls, save_call
from ckpt.distributed.writing import BlobPlan, assemble_v3, shard_keys, write_rank_files
from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointWriteError,
)
from ckpt.format import (
    MANIFEST_NAME,
    FileRecord,
    ItemRecord,
    Manifest,
    decode_manifest,
    encode_manifest,
    step_dir_name,
)
from ckpt.format.blobs import BLOB_DIR
from ckpt.format.header import ManifestHeader
from ckpt.saving.commit import (
    delete_checkpoint,
    open_attempt,
    remove_abandoned_temps,
    remove_leftovers,
)
from ckpt.saving.commit_protocol import Attempt, write_manifest
from ckpt.storage import Storage

__all__ = ["CollectiveSave", "PendingSave"]

logger = logging.getLogger(__name__)

_RAISED_AS = {
    "CheckpointExistsError": CheckpointExistsError,
    "CheckpointLockedError": CheckpointLockedError,
}


_CAPTURE_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError)
"""Errors of capturing a rank's state that every rank raises as such, as one process does
(a value that cannot be stored, named by its key path), not as a failed write."""


@dataclasses.dataclass
class PendingSave:
    """A collective save opened and planned on this rank, its files not yet written."""

    step: int
    overwrite: bool
    attempt: Attempt
    template: Manifest
    captured: RankCapture


@dataclasses.dataclass
class CollectiveSave:
    """Runs collective saves for one manager (see the module doc)."""

    storage: Storage
    group: RankGroup
    leftovers_checked: bool = False
    node_local: bool = False
    """Each rank's root is its own (node-local tiers): every rank opens its own attempt
    and commits rank 0's manifest there, with only its own files (``docs/tiers.md``)."""
    blob_index: Callable[[], dict[str, FileRecord]] | None = None
    """Incremental saves (format version 5): on the coordinator, the content store's
    index under the writer lock (``CheckpointWriter.blob_index``); on the other ranks,
    any non-``None`` value. ``None``: every shard goes to the step's files."""

    def begin(
        self,
        step: int,
        epoch: int | None,
        metrics: dict[str, float | int],
        overwrite: bool,
        items: dict[str, Any],
        prepare: Callable[[], None],
    ) -> PendingSave:
        """Open the save on every rank, capture this rank's state and plan its files (collective).

        Args:
            step: The step.
            epoch: The epoch, or ``None``.
            metrics: Checked metrics.
            overwrite: Replace a committed ``step``.
            items: Every item, the random streams included.
            prepare: Run on the coordinator before anything is written (takes the
                writer lock, refuses an existing step); what it raises is raised
                on every rank.

        Returns:
            The save, ready for :meth:`finish` (its tensors may still be live ones:
            stage them first to finish in the background).
        """
        group = self.group
        opened = self._open(step, overwrite, prepare) if group.is_coordinator else None
        plan = group.broadcast_json(opened)
        assert isinstance(plan, dict)
        if "error" in plan:
            kind, message, path, key = plan["error"]
            raise _RAISED_AS.get(kind, CheckpointWriteError)(
                message, path=path or self.storage.url_of(step_dir_name(step)), key=key
            )
        attempt = Attempt.from_json(plan)
        file_token, header = attempt.file_token, attempt.header
        created_at, versions = header.created_at, header.versions
        template = Manifest(step, epoch, metrics, {}, {}, {}, created_at, versions)
        error: BaseException | None = None
        local = None
        try:
            if self.node_local and not group.is_coordinator:
                self._open_own(attempt)
            own = capture_own(step, epoch, metrics, created_at, versions, file_token)
            local = capture_local(items, group.rank, own)
        except Exception as e:
            error = e
        call = save_call(step, epoch, metrics, overwrite, items, local)
        agreed = self._agree(step, attempt, error, call, as_raised=_CAPTURE_ERRORS)
        self._refuse_different_calls(step, attempt, agreed)
        assert local is not None
        try:
            captured = lay_out(local, group.rank, file_token, group.all_gather_json)
        except Exception as e:  # DCP's planning is the same on every rank: all raise alike
            self._agree(step, attempt, e)
            raise
        return PendingSave(step, overwrite, attempt, template, captured)

    def _refuse_different_calls(self, step: int, attempt: Attempt, calls: list[Any]) -> None:
        """Abandon the save and raise on every rank when the ranks' ``save`` calls differ.

        Raises:
            RankMismatchError: Naming each rank's call, the step directory, and the item
                when one item differs.
        """
        refused = refuse_different_calls(step, calls, self.storage.url_of(step_dir_name(step)))
        if refused is None:
            return
        if self.group.is_coordinator or self.node_local:
            self._abandon(attempt)
        self.group.barrier()
        raise refused

    def finish(
        self,
        pending: PendingSave,
        guard: Callable[[], None] | None,
        retain: Callable[[], None] | None = None,
    ) -> Manifest:
        """Write this rank's files, agree, and commit on the coordinator (collective).

        Args:
            pending: What :meth:`begin` returned.
            guard: Run on the coordinator just before the commit point.
            retain: Run on the coordinator after the commit, before any rank returns
                (retention: deleting what the policies drop).

        Returns:
            The manifest (on ranks other than the coordinator, without file records).
        """
        start = time.perf_counter()
        step, attempt, group = pending.step, pending.attempt, self.group
        report: Any = None
        error: BaseException | None = None
        try:
            plan = None if self.blob_index is None else self._plan_blobs(pending)
            report = write_rank_files(self.storage, attempt.directory, pending.captured, plan)
        except Exception as e:
            error = self._unseen(attempt, e)
        reports = self._agree(step, attempt, error, report)
        outcome: Any = None
        if group.is_coordinator:
            outcome = self._commit(
                step,
                attempt,
                pending.template,
                pending.captured.sharded_items,
                reports,
                pending.overwrite,
                guard,
            )
            if retain is not None and not outcome.get("error"):
                retain()  # never raises: retention logs what it cannot delete
        outcome = group.broadcast_json(outcome)
        assert isinstance(outcome, dict)
        if self.node_local and not group.is_coordinator:
            self._commit_own(attempt, outcome, retain)
        if outcome.get("error"):
            raise CheckpointWriteError(
                f"could not commit step {step}: {outcome['error']}; nothing was committed "
                "and earlier checkpoints are intact",
                path=self.storage.url_of(step_dir_name(step)),
            )
        logger.info(
            "saved step %d from %d ranks to %s in %.3f s",
            step,
            group.world_size,
            self.storage.url_of(step_dir_name(step)),
            time.perf_counter() - start,
        )
        names = {n: ItemRecord("", None) for n in outcome["items"]}
        return dataclasses.replace(pending.template, items=names)

    def _plan_blobs(self, pending: PendingSave) -> BlobPlan:
        """Hash this rank's large shards; learn which blobs it writes (collective).

        Every rank sends the keys it references; the coordinator answers which the
        store holds; each missing blob is written by the lowest rank referencing it.
        A failure on any rank raises on every rank (and :meth:`_agree` reports it).
        """
        group = self.group
        keys: dict[str, tuple[str, str]] | None = None
        try:
            keys = shard_keys(pending.captured)
        finally:  # every rank takes part in both collectives, whatever happened
            mine = None if keys is None else sorted({key for key, _ in keys.values()})
            wanted = group.all_gather_json(mine)
            answer: Any = None
            if group.is_coordinator:
                answer = self._present(wanted)
            answer = group.broadcast_json(answer)
        assert keys is not None and isinstance(answer, dict)
        if answer.get("error"):
            raise CheckpointWriteError(
                f"incremental save: {answer['error']}",
                path=self.storage.url_of(step_dir_name(pending.step)),
            )
        present, owner = set(answer["present"]), dict[str, int]()
        for rank, ranks_keys in enumerate(wanted):
            for key in ranks_keys:
                owner.setdefault(key, rank)
        write = {k for k, _ in keys.values() if k not in present and owner[k] == group.rank}
        return BlobPlan(keys, write)

    def _present(self, wanted: list[Any]) -> dict[str, Any]:
        """On the coordinator: which of the keys the ranks reference the store holds."""
        if any(w is None for w in wanted):
            failed = [r for r, w in enumerate(wanted) if w is None]
            return {"error": f"ranks {failed} could not hash their shards"}
        assert self.blob_index is not None
        try:
            index = self.blob_index()
            self.storage.makedirs(BLOB_DIR)  # here, once: ranks creating it at once would race
        except Exception as e:
            return {"error": f"cannot list the content store: {describe_failure(e)}"}
        return {"present": sorted({k for w in wanted for k in w if k in index})}

    def _open(self, step: int, overwrite: bool, prepare: Callable[[], None]) -> dict[str, Any]:
        """On the coordinator: lock, check, clean up, and open the attempt (as JSON)."""
        try:
            prepare()
            if not self.leftovers_checked:
                self.leftovers_checked = True
                remove_leftovers(self.storage)
            attempt = open_attempt(
                self.storage,
                step,
                overwrite=overwrite,
                token=secrets.token_hex(4),
                header=ManifestHeader.now(),
                collective=True,
            )
        except CheckpointError as e:  # its reason and location apart: located once, not twice
            return {"error": [type(e).__name__, e.reason, e.path, e.key]}
        except OSError as e:
            return {"error": ["CheckpointWriteError", f"cannot start the save: {e}", None, None]}
        return attempt.to_json()

    def _agree(
        self,
        step: int,
        attempt: Attempt,
        error: BaseException | None,
        report: Any = None,
        as_raised: tuple[type[Exception], ...] = (),
    ) -> list[Any]:
        """Gather every rank's outcome (and report); on any failure abandon the save and raise.

        Every rank raises :class:`~ckpt.CheckpointWriteError`, or, when the lowest
        failing rank's error is of a class in ``as_raised``, that class: a rank
        that failed so raises its own error, the others one naming each failed rank.
        """
        docs = self.group.all_gather_json(
            {"error": None if error is None else describe_failure(error), "report": report}
        )
        failed = [(r, d["error"]) for r, d in enumerate(docs) if d["error"] is not None]
        if not failed:
            return [d["report"] for d in docs]
        if self.group.is_coordinator or self.node_local:
            self._abandon(attempt)
        self.group.barrier()  # every rank raises once the attempt is gone
        where = "; ".join(f"rank {r}: {message}" for r, message in failed)
        first = failed[0][1].split(":", 1)[0]
        agreed = next((cls for cls in as_raised if cls.__name__ == first), None)
        if agreed is not None and error is not None and type(error) is agreed:
            raise error
        if agreed is not None:
            raise agreed(
                f"could not save step {step}: {where}; nothing was written and earlier "
                "checkpoints are intact"
            ) from error
        failure = CheckpointWriteError(
            f"could not save step {step}: {where}; nothing was committed and earlier "
            "checkpoints are intact",
            path=self.storage.url_of(step_dir_name(step)),
        )
        if error is not None:
            raise failure from error
        raise failure

    def _unseen(self, attempt: Attempt, error: Exception) -> Exception:
        """``error``, or what to do when this rank cannot see the directory rank 0 opened."""
        if self.group.is_coordinator or not isinstance(error, FileNotFoundError):
            return error
        try:
            seen = self.storage.exists(attempt.directory)
        except OSError:
            seen = False
        if seen:
            return error
        return CheckpointWriteError(
            f"this rank cannot see the directory rank 0 opened for the save "
            f"({attempt.directory}): the checkpoint root must be on storage every rank "
            "of the group sees at the same path (a shared filesystem or an object store), "
            "not each node's local disk, and every rank must pass the same directory",
            path=self.storage.url_of(attempt.directory),
        )

    def _abandon(self, attempt: Attempt) -> None:
        """Remove what an attempt wrote (the coordinator, once every rank has stopped writing)."""
        attempt.protocol.abandon(self.storage, attempt)  # leftovers are removed by a later save

    def _commit(
        self,
        step: int,
        attempt: Attempt,
        template: Manifest,
        sharded_items: dict[str, Any],
        reports: list[Any],
        overwrite: bool,
        guard: Callable[[], None] | None,
    ) -> dict[str, Any]:
        """On the coordinator: write the manifest and commit; the outcome for every rank."""
        try:
            known = None if self.blob_index is None else self.blob_index()
            manifest = assemble_v3(template, sharded_items, reports, known)
            raw = encode_manifest(manifest)
            where = self.storage.url_of(attempt.directory, MANIFEST_NAME)
            decode_manifest(raw, where)  # as readers will
            if guard is not None:
                guard()
            write_manifest(self.storage, attempt, raw)
            attempt.protocol.finalize(self.storage, attempt, manifest)
        except Exception as e:
            logger.error("could not commit step %d: %s", step, e)
            self._abandon(attempt)
            return {"error": describe_failure(e)}
        outcome: dict[str, Any] = {"error": None, "items": list(manifest.items)}
        if self.node_local:
            outcome["manifest"] = base64.b64encode(raw).decode("ascii")
        return outcome

    def _open_own(self, attempt: Attempt) -> None:
        """Node-local roots, on a rank other than 0: open the same attempt in this rank's root.

        A step committed here but not in rank 0's root is an earlier run's: it goes.
        """
        if not attempt.renames:
            raise CheckpointWriteError(
                "node-local roots must be local disk", path=self.storage.url_of(attempt.directory)
            )
        step_name = step_dir_name(attempt.step)
        if self.storage.exists(step_name):
            delete_checkpoint(self.storage, attempt.step, "another save of this step committed")
        remove_abandoned_temps(self.storage)
        self.storage.makedirs(attempt.directory)

    def _commit_own(
        self, attempt: Attempt, outcome: dict[str, Any], retain: Callable[[], None] | None
    ) -> None:
        """Node-local roots, on a rank other than 0: commit rank 0's manifest here too.

        A failure here is logged: rank 0's root holds the commit, and this rank's
        copy of the step is missing (restore and copies do without it).
        """
        if outcome.get("error"):
            self._abandon(attempt)
            return
        try:
            raw = base64.b64decode(outcome["manifest"])
            where = self.storage.url_of(attempt.directory, MANIFEST_NAME)
            write_manifest(self.storage, attempt, raw)
            own = dataclasses.replace(attempt, overwrite=False)  # _open_own deleted the old one
            attempt.protocol.finalize(self.storage, own, decode_manifest(raw, where))
        except Exception as e:
            logger.warning("could not commit step %d in this rank's root: %s", attempt.step, e)
            self._abandon(attempt)
            return
        if retain is not None:
            retain()
