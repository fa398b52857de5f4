"""Reading committed checkpoints: the public reader, step listing, describe, streaming."""
