"""Training: the per-rank worker, the DeepSpeed engine, the loop and its callbacks, checkpoints."""
