"""The web app's classifier: one saved model or an ensemble, reloaded when its file changes, with Grad-CAM overlays."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from shared.data.images import decode_image
from shared.data.transforms import preprocess_image, resize_and_centre_crop
from shared.device import resolve_device
from shared.ensemble import Ensemble, check_same_task, normalise_pixels
from shared.errors import ModelError
from shared.explain.gradcam import find_target_layer, overlay_heatmap
from shared.models.classifier import SavedClassifier, load_classifier

DISPLAY_SIZE = 384
"""Side of the overlay image shown to the clinician: the model's crop, at a size a person can read."""
OVERLAY_JPEG_QUALITY = 92
"""A smooth heatmap over a photograph: JPEG at this quality looks the same as PNG at a fifth of the bytes."""
BATCH_SIZE = 8
"""Images per Grad-CAM pass: bounds memory for the backward pass while keeping batches efficient."""


@dataclass
class LoadedModel:
    """One saved classifier in memory, with what identifies the file it came from."""

    path: Path
    model: torch.nn.Module
    saved: SavedClassifier
    sha256: str
    modified_ns: int
    size: int
    target_layer: str
    """Grad-CAM's layer, found once at load rather than by a probe pass per request."""


@dataclass
class Prediction:
    """What the web app says about one image."""

    probabilities: dict[str, float]
    top_class: str
    top_probability: float
    malignant_probability: float
    malignant: bool
    overlay_jpeg: bytes


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(path: Path, device: torch.device) -> LoadedModel:
    status = path.stat()
    model, saved = load_classifier(path, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # Grad-CAM needs gradients of activations only, not of weights
    return LoadedModel(path, model, saved, file_sha256(path), status.st_mtime_ns, status.st_size, find_target_layer(model))


class Classifier:
    """The site's current global model (or an ensemble averaging probabilities), ready to classify and explain.

    Model files are checked before every request and reloaded when one has changed, so a new
    global model written by the next federated run is served without a restart. Requests are
    served one at a time: Grad-CAM hooks the model, and the CPU is better used by one batch
    than by interleaved ones.
    """

    def __init__(
        self, paths: list[Path], *, malignant_classes: list[str], malignant_threshold: float = 0.5, device: str = "cpu"
    ) -> None:
        if not paths:
            raise ModelError("the web app needs at least one saved model: pass --model PATH (a run's final_model.pt)")
        self.paths = [Path(path) for path in paths]
        self.device = resolve_device(device)
        self.malignant_classes = list(malignant_classes)
        self.malignant_threshold = float(malignant_threshold)
        self._lock = threading.Lock()
        self.models: list[LoadedModel] = []
        self.stale: dict[str, str] = {}
        """Model files that changed but do not load, by file name, with why; the last good model still answers."""
        self._reload_changed()

    # ---- model files -------------------------------------------------------------------------

    def _reload_changed(self) -> None:
        """Load every model file that is new or changed since it was loaded, then check they fit together.

        A changed file that does not load (half-copied, corrupt) leaves the last good model in
        service and is reported as stale until a good file replaces it.
        """
        loaded = {entry.path: entry for entry in self.models}
        fresh, stale = [], {}
        for path in self.paths:
            entry = loaded.get(path)
            try:
                status = path.stat()
                if entry is None or (status.st_mtime_ns, status.st_size) != (entry.modified_ns, entry.size):
                    entry = _load(path, self.device)
            except (OSError, ModelError) as error:
                if entry is None:
                    if isinstance(error, ModelError):
                        raise
                    raise ModelError(f"saved model {path} cannot be read ({error.strerror}); give an existing model file") from error
                # Keep serving the last good model while the file is being replaced (or until it is fixed).
                stale[path.name] = str(error)
            fresh.append(entry)
        _check_compatible(fresh, self.malignant_classes)
        self.models, self.stale = fresh, stale

    @property
    def classes(self) -> list[str]:
        """The class list every model shares."""
        return list(self.models[0].saved.classes)

    @property
    def image_size(self) -> int:
        """The models' input side in pixels."""
        return self.models[0].saved.preprocess.image_size

    @property
    def version(self) -> str:
        """Which model files answered: `name@sha256-prefix`, joined by '+' for an ensemble."""
        return "+".join(f"{entry.path.name}@{entry.sha256[:12]}" for entry in self.models)

    def describe(self) -> dict:
        """The served model(s), for the API and the page."""
        first = self.models[0].saved
        return {
            "version": self.version,
            "classes": self.classes,
            "malignant_classes": self.malignant_classes,
            "malignant_threshold": self.malignant_threshold,
            "image_size": self.image_size,
            "ensemble_size": len(self.models),
            "models": [
                {
                    "file": entry.path.name,
                    "sha256": entry.sha256,
                    "architecture": entry.saved.model_name,
                    "metadata": entry.saved.metadata,
                }
                for entry in self.models
            ],
            "preprocess": first.preprocess.model_dump(),
            "stale": dict(self.stale),
        }

    def refresh(self) -> None:
        """Reload changed model files (what every request does first)."""
        with self._lock:
            self._reload_changed()

    # ---- classification ----------------------------------------------------------------------

    def classify_files(self, paths: list[Path]) -> tuple[list[Prediction], str]:
        """Classify and explain image files already checked by the upload rules, and the model version that answered.

        The version is read under the same lock as the classification, so a model reloaded by a
        concurrent request can never be recorded for these predictions. Each image is decoded and
        reduced to the model's input and the overlay's crop before the next is decoded, so memory
        holds one full-size image at a time. Bad files raise `DataError`.
        """
        with self._lock:
            self._reload_changed()
            preprocess = self.models[0].saved.preprocess
            preprocess_mean, preprocess_std = self.models[0].saved.mean, self.models[0].saved.std
            display_size = max(DISPLAY_SIZE, self.image_size)
            model_inputs, displays = [], []
            for path in paths:
                # Decoded exactly as the training cache decodes, so the model sees what it was trained on.
                image = decode_image(path, draft_size=2 * preprocess.image_size)
                model_inputs.append(preprocess_image(image, preprocess))
                displays.append(resize_and_centre_crop(image, display_size))
                del image
            predictions: list[Prediction] = []
            for start in range(0, len(model_inputs), BATCH_SIZE):
                batch = np.stack(model_inputs[start : start + BATCH_SIZE])
                heatmaps, probabilities = self._ensemble().explain(normalise_pixels(batch, preprocess_mean, preprocess_std).to(self.device))
                for display, probability_row, heatmap in zip(displays[start : start + BATCH_SIZE], probabilities, heatmaps):
                    predictions.append(self._prediction(display, probability_row, heatmap))
            return predictions, self.version

    def _ensemble(self) -> Ensemble:
        """The loaded models as one ensemble (shared.ensemble: mean probabilities, mean Grad-CAM maps of its top class)."""
        return Ensemble(
            [entry.model for entry in self.models], self.models[0].saved, [entry.path for entry in self.models],
            target_layers=[entry.target_layer for entry in self.models],
        )

    def _prediction(self, display: np.ndarray, probability_row: np.ndarray, heatmap: np.ndarray) -> Prediction:
        classes = self.classes
        top_index = int(np.argmax(probability_row))
        # The overlay shows the same centre crop the model saw, in the image's own colours, at a readable size.
        overlay = overlay_heatmap(display, np.clip(heatmap, 0.0, 1.0))
        encoded, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(np.ascontiguousarray(overlay), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, OVERLAY_JPEG_QUALITY]
        )
        if not encoded:
            raise RuntimeError("OpenCV could not encode the Grad-CAM overlay as JPEG")
        probabilities = {name: float(value) for name, value in zip(classes, probability_row)}
        malignant_probability = float(sum(probabilities[name] for name in self.malignant_classes))
        return Prediction(
            probabilities=probabilities,
            top_class=classes[top_index],
            top_probability=float(probability_row[top_index]),
            malignant_probability=malignant_probability,
            # Flagged when a malignant class wins or when the malignant classes together are likely.
            malignant=classes[top_index] in self.malignant_classes or malignant_probability >= self.malignant_threshold,
            overlay_jpeg=jpeg.tobytes(),
        )


def _check_compatible(models: list[LoadedModel], malignant_classes: list[str]) -> None:
    """Ensemble members must share classes and preprocessing; the malignant classes must be among the classes."""
    check_same_task([entry.saved for entry in models], [entry.path for entry in models])
    first = models[0]
    unknown = [name for name in malignant_classes if name not in first.saved.classes]
    if unknown:
        raise ModelError(
            f"malignant classes {unknown} are not classes of {first.path} ({first.saved.classes}); "
            "set malignant-classes to classes the model knows"
        )
