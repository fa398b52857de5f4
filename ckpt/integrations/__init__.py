"""ckpt inside training frameworks; each module imports its framework, so import it explicitly.

- :mod:`ckpt.integrations.lightning`: ``CheckpointIO``, Lightning's checkpoint storage plugin
  (``pip install 'ckpt[lightning]'``).
"""
