"""Proving that a training loop resumes exactly: :func:`verify_resume` and its report."""

from ckpt.verification.report import Difference, ResumeReport
from ckpt.verification.verify import verify_resume

__all__ = ["Difference", "ResumeReport", "verify_resume"]
