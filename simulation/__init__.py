"""Multi-site simulation of skin-fl on one machine, pooled-training baseline and benchmarks."""
