"""ONNX export of a saved classifier for edge devices, and ONNX Runtime inference with class-activation maps.

The exported graph takes normalised images [N, 3, S, S] and returns `logits` [N, K] and `cams`
[N, K, h, w]: for every class, the classifier weights applied to the last feature map. For the
heads timm gives EfficientNets, ResNets, DenseNets and MobileNetV2 (global average pooling then
one linear layer) the gradient of a class score with respect to the feature map is that class's
weight vector divided by h * w at every position, so Grad-CAM's channel weights are the
classifier weights and Grad-CAM equals relu(cams[class]) up to a positive factor that the
[0, 1] scaling removes. The export checks that the head is of that kind and refuses otherwise
(then Grad-CAM needs PyTorch's autograd: use the PyTorch path).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ModelError
from shared.explain.gradcam import find_target_layer
from shared.models.classifier import SavedClassifier

ONNX_OPSET = 17
METADATA_KEY = "skin_fl"


class _LogitsAndCams(nn.Module):
    """Wraps a classifier so one forward pass returns its logits and every class's activation map."""

    def __init__(self, model: nn.Module, layer_name: str, classifier: nn.Linear) -> None:
        super().__init__()
        self.model = model
        self.classifier_weight = nn.Parameter(classifier.weight.detach().clone(), requires_grad=False)
        self._features: torch.Tensor | None = None
        self.handle = model.get_submodule(layer_name).register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self._features = output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        cams = torch.einsum("kc,nchw->nkhw", self.classifier_weight, self._features)
        return logits, cams


def linear_head(model: nn.Module, layer_name: str, image_size: int) -> nn.Linear:
    """The model's final linear layer, after checking that logits = W . mean(feature map) + b."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        raise ModelError(
            f"{type(model).__name__}'s classifier is {type(classifier).__name__}, not one linear layer; "
            "class-activation maps from ONNX need a pooled linear head (EfficientNet, ResNet, DenseNet); "
            "export without --cams or explain with PyTorch"
        )
    captured = {}
    handle = model.get_submodule(layer_name).register_forward_hook(lambda _m, _i, output: captured.update(features=output))
    try:
        with torch.no_grad():
            probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
            logits = model(probe)
    finally:
        handle.remove()
    pooled = captured["features"].float().mean(dim=(2, 3))
    expected = F.linear(pooled, classifier.weight.float(), None if classifier.bias is None else classifier.bias.float())
    if not torch.allclose(expected, logits.float(), atol=1e-3, rtol=1e-3):
        raise ModelError(
            f"the head after {layer_name!r} is not global average pooling plus one linear layer, so its "
            "class-activation maps would differ from Grad-CAM; export without --cams or explain with PyTorch"
        )
    return classifier


def export_onnx(model: nn.Module, saved: SavedClassifier, path: Path, *, with_cams: bool = True) -> Path:
    """Write the classifier as an ONNX file (batch size dynamic, image size fixed) with its description in the metadata."""
    from shared.extras import require_extra

    require_extra("onnx", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    size = saved.preprocess.image_size
    sample = torch.zeros(1, 3, size, size)
    output_names = ["logits"]
    exported: nn.Module = model
    layer_name = None
    if with_cams:
        layer_name = find_target_layer(model)
        classifier = linear_head(model, layer_name, size)
        exported = _LogitsAndCams(model, layer_name, classifier).eval()
        output_names.append("cams")
    dynamic_axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter traces forward hooks, which the target-layer capture needs; it warns that it is legacy.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                exported, (sample,), str(path), input_names=["images"], output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, dynamo=False,
            )
    finally:
        if with_cams:
            exported.handle.remove()
    import onnx

    onnx_model = onnx.load(str(path))
    description = {
        "model_name": saved.model_name,
        "classes": saved.classes,
        "preprocess": saved.preprocess.model_dump(mode="json"),
        "mean": list(saved.mean),
        "std": list(saved.std),
        "target_layer": layer_name,
        "outputs": output_names,
    }
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(description)
    onnx.save(onnx_model, str(path))
    return path


@dataclass
class OnnxClassifier:
    """An exported classifier run by ONNX Runtime: probabilities and, when exported with maps, Grad-CAM heatmaps."""

    session: object
    saved: SavedClassifier
    has_cams: bool

    @classmethod
    def load(cls, path: Path, threads: int | None = None) -> OnnxClassifier:
        """Open an ONNX file written by `export_onnx` (ONNX Runtime, CPU, `threads` intra-op threads)."""
        from shared.extras import require_extra

        require_extra("onnx", "running an ONNX model")
        import onnxruntime

        from shared.config import PreprocessConfig

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"ONNX file {path} does not exist; write one with skin-fl-explain --export-onnx")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise ModelError(f"{path} is not a readable ONNX model ({error}); export it again") from error
        metadata = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ModelError(f"{path} was not exported by skin-fl (no '{METADATA_KEY}' metadata); export it with skin-fl")
        description = json.loads(metadata[METADATA_KEY])
        saved = SavedClassifier(
            model_name=description["model_name"],
            classes=list(description["classes"]),
            preprocess=PreprocessConfig.model_validate(description["preprocess"]),
            mean=tuple(description["mean"]),
            std=tuple(description["std"]),
            metadata={"target_layer": description.get("target_layer")},
        )
        return cls(session, saved, "cams" in description["outputs"])

    @property
    def classes(self) -> list[str]:
        """The class names, in output order."""
        return self.saved.classes

    def _run(self, images: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return self.session.run(None, {"images": np.ascontiguousarray(array, dtype=np.float32)})

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities float32 [N, K] of normalised images [N, 3, S, S]."""
        return _softmax(self._run(images)[0])

    def explain(self, images: torch.Tensor | np.ndarray, class_indices=None) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps float32 [N, S, S] in [0, 1] (Grad-CAM of the linear head) and probabilities [N, K].

        Post-processing is NumPy and OpenCV only (bilinear resize with half-pixel centres, as
        PyTorch's `align_corners=False`), so an edge device needs no PyTorch.
        """
        if not self.has_cams:
            raise ModelError("this ONNX file was exported without class-activation maps; export it again with maps")
        logits, cams = self._run(images)
        probabilities = _softmax(logits)
        chosen = probabilities.argmax(axis=1) if class_indices is None else np.asarray(class_indices, dtype=np.int64).reshape(-1)
        if chosen.shape[0] != cams.shape[0]:
            raise ModelError(f"{chosen.shape[0]} class indices for {cams.shape[0]} images; give one per image or none")
        side = int(np.asarray(images.shape)[-1])
        maps = np.stack(
            [cv2.resize(np.maximum(cam[index], 0.0), (side, side), interpolation=cv2.INTER_LINEAR) for cam, index in zip(cams, chosen)]
        )
        low, high = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
        span = high - low
        scaled = np.where(span > 1e-12, (maps - low) / np.where(span > 1e-12, span, 1.0), 0.0)
        return scaled.astype(np.float32), probabilities


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)
