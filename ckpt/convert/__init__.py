"""Ways in and out: export weights as Hugging Face safetensors, import other tools' checkpoints."""

from ckpt.convert.export import export
from ckpt.convert.importing import ImportReport, import_checkpoint

__all__ = ["ImportReport", "export", "import_checkpoint"]
