"""Dataset readers, splits, site partitioning, preprocessing, caching and loaders."""
