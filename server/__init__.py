"""Flower ServerApp for skin-fl: strategies with checkpoints and history, and the coordinator's tools."""
