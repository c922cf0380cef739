"""Random cached training images of one site, for tests of the training paths (DP included)."""

import numpy as np

from shared.data.cache import CachedImages


def random_site_images(classes: list[str], count: int = 12, size: int = 32, seed: int = 0) -> CachedImages:
    """`count` random images, labels cycling through `classes`, all in the training split of "site_a"."""
    rng = np.random.default_rng(seed)
    return CachedImages(
        images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
        labels=np.arange(count) % len(classes),
        image_ids=[f"img_{row}" for row in range(count)],
        splits=np.asarray(["train"] * count),
        classes=classes,
        source="site_a cache",
    )
