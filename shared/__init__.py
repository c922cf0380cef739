"""Plain-PyTorch core of skin-fl: data, models, training, metrics and weights, with no Flower."""

from shared import torchvision_compat as _torchvision_compat

_torchvision_compat.ensure_torchvision_importable()
