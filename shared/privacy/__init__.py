"""Differential privacy: model preparation, DP-SGD training, accounting and budget."""
