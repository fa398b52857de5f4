"""Multi-rank checkpoints: ckpt inside a torch.distributed process group."""
