"""Class-conditional generator and projection discriminator (spectral norm), and their checkpoint file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.config import GanConfig
from shared.durable_files import replaced_atomically
from shared.errors import ModelError
from shared.run_folder import RunFolder
from shared.weights import load_arrays_into, model_to_arrays

SAVED_FORMAT = "skin-fl-cgan"
SAVED_VERSION = 2
"""2: spectral normalisation by `SpectralNormalised` (version 1 used torch parametrizations; still read)."""
GENERATOR_PREFIX = "generator."
DISCRIMINATOR_PREFIX = "discriminator."
_BASE_SIDE = 4


def _blocks_for(image_size: int) -> int:
    blocks = math.log2(image_size / _BASE_SIDE)
    if image_size < 32 or blocks != int(blocks):
        raise ModelError(f"GAN image size {image_size} must be a power of two of at least 32 (32, 64, 128)")
    return int(blocks)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are looked up per class (de Vries et al. 2017; used by BigGAN/SNGAN)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normalise, then scale and shift each image by its class's parameters."""
        normalised = self.norm(features)
        return normalised * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class _UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = ConditionalBatchNorm(in_channels, num_classes)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        upsampled = nn.functional.interpolate(features, scale_factor=2, mode="nearest")
        hidden = self.conv(nn.functional.relu(self.norm(upsampled, labels)))
        return hidden + self.skip(upsampled)


class ConditionalGenerator(nn.Module):
    """Noise and a class index to an RGB image in [-1, 1]: a linear 4x4 seed, then upsampling residual blocks."""

    def __init__(self, num_classes: int, image_size: int = 64, latent_dim: int = 128, channels: int = 64) -> None:
        super().__init__()
        blocks = _blocks_for(image_size)
        self.num_classes, self.image_size, self.latent_dim = num_classes, image_size, latent_dim
        widths = [channels * min(8, 2 ** (blocks - index)) for index in range(blocks + 1)]
        self.class_embedding = nn.Embedding(num_classes, latent_dim)
        self.seed = nn.Linear(2 * latent_dim, widths[0] * _BASE_SIDE * _BASE_SIDE)
        self.blocks = nn.ModuleList(_UpBlock(widths[i], widths[i + 1], num_classes) for i in range(blocks))
        self.out_norm = nn.BatchNorm2d(widths[-1])
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, latent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] for noise [B, latent_dim] and class indices [B]."""
        hidden = self.seed(torch.cat([latent, self.class_embedding(labels)], dim=1))
        hidden = hidden.view(latent.shape[0], -1, _BASE_SIDE, _BASE_SIDE)
        for block in self.blocks:
            hidden = block(hidden, labels)
        return torch.tanh(self.to_rgb(nn.functional.relu(self.out_norm(hidden))))

    def sample_latent(self, count: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Standard-normal noise for `count` images (seeded through `generator`)."""
        return torch.randn(count, self.latent_dim, generator=generator).to(device)


class SpectralNormalised(nn.Module):
    """A Linear, Conv2d or Embedding whose weight acts divided by its largest singular value (Miyato et al. 2018).

    The same arithmetic as `torch.nn.utils.parametrizations.spectral_norm` (one power iteration
    per training forward; sigma = u . W v, differentiable in W), but the division is applied to
    the input (Linear, Conv2d: f(x / sigma) = f(x; W / sigma)) or the output (Embedding), and
    the wrapped layer stays a plain torch layer. Opacus computes per-sample gradients of plain
    layers only, so this is what makes the discriminator trainable under DP-SGD. With
    `sigma_gradient` off (as DP-SGD sets it) sigma is a constant of each step: the per-sample
    gradients Opacus computes are then the exact gradients of each image's loss.
    """

    def __init__(self, layer: nn.Module, power_iterations_at_start: int = 15, eps: float = 1e-12) -> None:
        super().__init__()
        self.layer = layer
        self.eps = eps
        self.sigma_gradient = True
        matrix = self._weight_matrix()
        self.register_buffer("u", nn.functional.normalize(torch.randn(matrix.shape[0]), dim=0, eps=eps))
        self.register_buffer("v", nn.functional.normalize(torch.randn(matrix.shape[1]), dim=0, eps=eps))
        self._power_iteration(power_iterations_at_start)

    def _weight_matrix(self) -> torch.Tensor:
        return self.layer.weight.flatten(1)

    @torch.no_grad()
    def _power_iteration(self, iterations: int) -> None:
        matrix = self._weight_matrix()
        for _ in range(iterations):
            self.u.copy_(nn.functional.normalize(torch.mv(matrix, self.v), dim=0, eps=self.eps))
            self.v.copy_(nn.functional.normalize(torch.mv(matrix.t(), self.u), dim=0, eps=self.eps))

    def sigma(self) -> torch.Tensor:
        """The current estimate of the weight's largest singular value (one power step first when training)."""
        if self.training:
            self._power_iteration(1)
        matrix = self._weight_matrix() if self.sigma_gradient else self._weight_matrix().detach()
        return torch.dot(self.u.clone(), torch.mv(matrix, self.v.clone()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's output with its weight divided by sigma."""
        sigma = self.sigma()
        if isinstance(self.layer, nn.Embedding):
            return self.layer(inputs) / sigma.to(self.layer.weight.dtype)
        return self.layer(inputs / sigma.to(inputs.dtype))


def spectral_norm(layer: nn.Module) -> SpectralNormalised:
    """`layer` (Linear, Conv2d or Embedding) spectrally normalised."""
    return SpectralNormalised(layer)


def use_sigma_gradient(discriminator: nn.Module, enabled: bool) -> None:
    """Let gradients flow through every spectral norm's sigma (plain training) or treat it as a constant (DP-SGD)."""
    for module in discriminator.modules():
        if isinstance(module, SpectralNormalised):
            module.sigma_gradient = enabled


def _migrate_version_1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A version-1 discriminator state dict (torch spectral-norm parametrizations) under version-2 names."""
    renames = ((".parametrizations.weight.original", ".layer.weight"), (".parametrizations.weight.0._u", ".u"), (".parametrizations.weight.0._v", ".v"))
    migrated = {}
    for name, tensor in state.items():
        for old, new in renames:
            if name.endswith(old):
                name = name[: -len(old)] + new
                break
        else:
            if name.endswith(".bias") and not name.endswith(".layer.bias"):
                name = name[: -len(".bias")] + ".layer.bias"
        migrated[name] = tensor
    return migrated


class _DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.conv1 = spectral_norm(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features if self.first else nn.functional.relu(features)
        hidden = self.conv2(nn.functional.relu(self.conv1(hidden)))
        return nn.functional.avg_pool2d(hidden, 2) + nn.functional.avg_pool2d(self.skip(features), 2)


class ProjectionDiscriminator(nn.Module):
    """Spectrally normalised residual discriminator with a class projection (Miyato & Koyama 2018).

    Score = w . h(x) + embed(y) . h(x); without labels only the unconditional term. No BatchNorm
    and only plain layers under the spectral norms, so per-sample gradients (DP-SGD) are exact.
    """

    def __init__(self, num_classes: int, image_size: int = 64, channels: int = 64) -> None:
        super().__init__()
        blocks = _blocks_for(image_size)
        widths = [3] + [channels * min(8, 2**index) for index in range(blocks)]
        self.num_classes, self.image_size = num_classes, image_size
        self.blocks = nn.ModuleList(_DownBlock(widths[i], widths[i + 1], first=i == 0) for i in range(blocks))
        self.linear = spectral_norm(nn.Linear(widths[-1], 1))
        self.class_projection = spectral_norm(nn.Embedding(num_classes, widths[-1]))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Realism score [B] (higher = more real) of images [B, 3, S, S] in [-1, 1] with class indices [B]."""
        hidden = images
        for block in self.blocks:
            hidden = block(hidden)
        pooled = nn.functional.relu(hidden).sum(dim=(2, 3))
        score = self.linear(pooled).squeeze(1)
        if labels is not None:
            score = score + (self.class_projection(labels) * pooled).sum(dim=1)
        return score


def build_gan(config: GanConfig, num_classes: int) -> tuple[ConditionalGenerator, ProjectionDiscriminator]:
    """A fresh generator and discriminator for `num_classes` classes at `config.image_size`."""
    if num_classes < 2:
        raise ModelError(f"a conditional GAN needs at least 2 classes, got {num_classes}")
    generator = ConditionalGenerator(num_classes, config.image_size, config.latent_dim, config.channels)
    discriminator = ProjectionDiscriminator(num_classes, config.image_size, config.channels)
    return generator, discriminator


def gan_to_arrays(generator: nn.Module, discriminator: nn.Module) -> dict[str, np.ndarray]:
    """Both networks' exchanged arrays in one flat dict, names prefixed generator./discriminator."""
    arrays = {GENERATOR_PREFIX + name: value for name, value in model_to_arrays(generator).items()}
    arrays.update({DISCRIMINATOR_PREFIX + name: value for name, value in model_to_arrays(discriminator).items()})
    return arrays


def load_gan_arrays(generator: nn.Module, discriminator: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Overwrite both networks in place from a flat dict written by `gan_to_arrays`."""
    load_arrays_into(generator, {k[len(GENERATOR_PREFIX):]: v for k, v in arrays.items() if k.startswith(GENERATOR_PREFIX)})
    load_arrays_into(
        discriminator, {k[len(DISCRIMINATOR_PREFIX):]: v for k, v in arrays.items() if k.startswith(DISCRIMINATOR_PREFIX)}
    )


@dataclass
class SavedGan:
    """What a GAN checkpoint says besides the weights: classes, architecture and round."""

    classes: list[str]
    image_size: int
    latent_dim: int
    channels: int
    metadata: dict = field(default_factory=dict)

    def gan_config(self, base: GanConfig | None = None) -> GanConfig:
        """`base` (or the defaults) with this checkpoint's architecture."""
        update = {"image_size": self.image_size, "latent_dim": self.latent_dim, "channels": self.channels}
        return (base or GanConfig()).model_copy(update=update)


def save_gan(path: Path, generator: ConditionalGenerator, discriminator: ProjectionDiscriminator, classes: list[str], metadata: dict) -> Path:
    """Write both networks with their classes and architecture to `path` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": SAVED_FORMAT,
        "version": SAVED_VERSION,
        "classes": list(classes),
        "image_size": generator.image_size,
        "latent_dim": generator.latent_dim,
        "channels": discriminator.blocks[0].conv1.layer.out_channels,
        "generator": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "discriminator": {k: v.detach().cpu() for k, v in discriminator.state_dict().items()},
        "metadata": dict(metadata),
    }
    with replaced_atomically(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_gan(path: Path, device: torch.device | str = "cpu") -> tuple[ConditionalGenerator, ProjectionDiscriminator, SavedGan]:
    """The generator and discriminator (eval mode) saved in `path`, and its description."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GAN checkpoint {path} does not exist; give a file from a run's gan/checkpoints folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ModelError(f"{path} is not a readable GAN checkpoint ({error}); give a file from gan/checkpoints") from error
    if not isinstance(payload, dict) or payload.get("format") != SAVED_FORMAT:
        raise ModelError(f"{path} is not a skin-fl GAN checkpoint (a classifier file?); give a file from gan/checkpoints")
    saved = SavedGan(
        classes=list(payload["classes"]),
        image_size=int(payload["image_size"]),
        latent_dim=int(payload["latent_dim"]),
        channels=int(payload["channels"]),
        metadata=dict(payload.get("metadata", {})),
    )
    generator, discriminator = build_gan(saved.gan_config(), len(saved.classes))
    generator.load_state_dict(payload["generator"])
    discriminator_state = payload["discriminator"]
    if int(payload.get("version", 1)) == 1:
        discriminator_state = _migrate_version_1(discriminator_state)
    discriminator.load_state_dict(discriminator_state)
    return generator.to(device).eval(), discriminator.to(device).eval(), saved


def gan_checkpoint_path(run_folder: Path, server_round: int) -> Path:
    """Where the global GAN after `server_round` is saved in a run folder."""
    return RunFolder(run_folder).gan_checkpoint(server_round)


def latest_gan_checkpoint(run_folder: Path) -> tuple[int, Path] | None:
    """The last GAN round checkpointed in `run_folder` and its file, or None when there is none."""
    found = RunFolder(run_folder).gan_checkpoint_files()
    return max(found.items()) if found else None
