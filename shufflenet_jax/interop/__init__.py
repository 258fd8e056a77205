"""Weights in (PyTorch checkpoints) and models out (StableHLO), without importing PyTorch."""
