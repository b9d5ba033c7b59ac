"""Trained score networks: architectures, our checkpoint format, the paper's checkpoints, training."""
