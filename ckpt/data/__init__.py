"""Data position: a sampler that resumes mid-epoch at exactly the next batch."""

from ckpt.data.loader import ResumableDataLoader, resumable_loader
from ckpt.data.sampler import ResumableSampler

__all__ = ["ResumableDataLoader", "ResumableSampler", "resumable_loader"]
