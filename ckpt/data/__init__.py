"""Data position: a sampler that resumes mid-epoch at exactly the next batch."""

from ckpt.data.sampler import ResumableDataLoader, ResumableSampler, resumable_loader

__all__ = ["ResumableDataLoader", "ResumableSampler", "resumable_loader"]
