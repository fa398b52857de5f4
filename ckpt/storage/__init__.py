"""Storage: the only package that touches a filesystem.

``Storage(url, storage_options)`` resolves a checkpoint root once and returns
its backend: :class:`LocalStorage` (descriptors, no links followed, fsync,
``renameat2``) or :class:`RemoteStorage` (fsspec object stores: conditional
create, multipart, retries). Each backend names its :class:`CommitStrategy`.
"""

from ckpt.storage.base import CommitStrategy, Storage, WriterLock, open_storage, storage_of
from ckpt.storage.local import SYSCALLS, BackgroundSyncs, LocalStorage, SysCalls
from ckpt.storage.remote import RETRIES, RETRY_BASE_SECONDS, RemoteStorage

Storage.register(LocalStorage, RemoteStorage)

__all__ = [
    "RETRIES",
    "RETRY_BASE_SECONDS",
    "SYSCALLS",
    "BackgroundSyncs",
    "CommitStrategy",
    "LocalStorage",
    "RemoteStorage",
    "Storage",
    "SysCalls",
    "WriterLock",
    "open_storage",
    "storage_of",
]
