"""Ensembles of saved classifiers (e.g. a run's last checkpoints): averaged probabilities and averaged Grad-CAM maps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.errors import ModelError
from shared.explain.gradcam import GradCam, Method, normalise_maps
from shared.models.classifier import SavedClassifier, load_classifier
from shared.run_folder import RunFolder
from shared.training import place_model


def expand_model_paths(paths: list[Path], last: int | None = None) -> list[Path]:
    """Model files named by files and run folders: a folder gives its final model, or with `last` its last k checkpoints."""
    if last is not None and last < 1:
        raise ModelError(f"--last {last}: give how many of a run's last round checkpoints to average (1 or more)")
    expanded: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            if last is None:
                expanded.append(RunFolder(path).final_model)
                continue
            checkpoints = list(RunFolder(path).checkpoint_files().values())
            if not checkpoints:
                raise ModelError(f"run folder {path} has no checkpoints/round_NNN.pt; give a run folder written by skin-fl")
            expanded.extend(checkpoints[-last:])
        else:
            if last is not None:
                raise ModelError(f"--last applies to run folders, and {path} is a file; give the run folder instead")
            expanded.append(path)
    if not expanded:
        raise ModelError("no model given; name a saved model file (final_model.pt, round_NNN.pt) or a run folder")
    return expanded


def check_same_task(saved: list[SavedClassifier], paths: list[Path]) -> None:
    """Raise ModelError unless every saved model has the first one's classes, preprocessing and normalisation."""
    first = saved[0]
    for entry, path in zip(saved[1:], paths[1:]):
        if (entry.classes, entry.preprocess, entry.mean, entry.std) != (first.classes, first.preprocess, first.mean, first.std):
            raise ModelError(
                f"{path} has classes {entry.classes} at {entry.preprocess.image_size} px but {paths[0]} has "
                f"{first.classes} at {first.preprocess.image_size} px; an ensemble averages models of one task, "
                "so give models from runs with the same classes and preprocessing (e.g. checkpoints of one run)"
            )


@dataclass
class Ensemble:
    """One or more classifiers over the same classes and preprocessing whose probabilities are averaged."""

    members: list[nn.Module]
    saved: SavedClassifier
    paths: list[Path]
    target_layers: list[str] | None = None
    """Each member's Grad-CAM layer, when already known (else found by a probe pass per explanation)."""

    @classmethod
    def load(cls, paths: list[Path], device: str | torch.device = "cpu") -> Ensemble:
        """Load saved models that agree on classes, preprocessing and normalisation, in eval mode on `device`."""
        if not paths:
            raise ModelError("an ensemble needs at least one saved model file")
        loaded = [load_classifier(path, device=device) for path in paths]
        check_same_task([saved for _, saved in loaded], [Path(path) for path in paths])
        members = [place_model(model, torch.device(device)).eval() for model, _ in loaded]
        return cls(members, loaded[0][1], [Path(path) for path in paths])

    @property
    def classes(self) -> list[str]:
        """The class names, in output order."""
        return self.saved.classes

    def __len__(self) -> int:
        return len(self.members)

    def predict(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Mean class probabilities float32 [N, K] of the members on normalised images [N, 3, H, W]."""
        device = next(self.members[0].parameters()).device
        chunks = []
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device)
                probabilities = torch.stack([member(batch).float().softmax(dim=1) for member in self.members]).mean(dim=0)
                chunks.append(probabilities.cpu())
        return torch.cat(chunks).numpy().astype(np.float32)

    def explain(
        self, images: torch.Tensor, class_indices: torch.Tensor | None = None, method: Method = "gradcam", batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Grad-CAM maps averaged over the members (rescaled to [0, 1]) and the mean probabilities.

        Every member explains the same class: the given one, or the ensemble's predicted class.
        """
        layers = self.target_layers or [None] * len(self.members)
        if len(self.members) == 1:
            with GradCam(self.members[0], target_layer=layers[0], method=method, batch_size=batch_size) as cam:
                return cam(images, class_indices)
        probabilities = self.predict(images)
        if class_indices is None:
            class_indices = torch.from_numpy(probabilities.argmax(axis=1))
        summed = None
        for member, layer in zip(self.members, layers):
            with GradCam(member, target_layer=layer, method=method, batch_size=batch_size) as cam:
                maps, _ = cam(images, class_indices)
            summed = maps if summed is None else summed + maps
        return normalise_maps(torch.from_numpy(summed / len(self.members))).numpy().astype(np.float32), probabilities


def normalise_pixels(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 RGB images [N, H, W, 3] -> float32 [N, 3, H, W] scaled to [0, 1] and normalised by mean and std."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ModelError(f"expected RGB images [N, H, W, 3], got shape {pixels.shape}")
    if not pixels.flags.writeable or not pixels.flags.c_contiguous:
        pixels = np.array(pixels)  # torch refuses read-only memory (the cache's memory map)
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    mean_tensor = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    std_tensor = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return ((tensor - mean_tensor) / std_tensor).contiguous()
