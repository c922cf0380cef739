"""The last stage's refit: the model's cut, the sites' summed gradients over cached activations, the server's steps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fake_grid import RefitSitesGrid
from shared.config import ModelConfig
from shared.data.cache import CachedImages
from shared.data.transforms import build_eval_transform
from shared.head_refit import SiteAnswer, SummedAnswers, balanced_class_weights, sum_answers
from shared.models.classifier import build_classifier, model_normalisation
from shared.models.frozen_features import frozen_part_fingerprint
from shared.models.model_cut import cut_model
from shared.precision import Precision
from shared.top_refit import refit_top, site_top_gradient

CLASSES = ["a", "b", "c"]
FP32 = Precision(None, False, "cpu")


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_classifier(ModelConfig(name=name, pretrained="none"), num_classes=3)
    with torch.no_grad():
        model.get_classifier().weight.normal_(0, 0.1)
    return model.eval()


def _images(count: int, seed: int, split: str = "train") -> CachedImages:
    rng = np.random.default_rng(seed)
    labels = np.array([index % 3 if index % 5 else 2 for index in range(count)])
    pixels = rng.integers(0, 60, (count, 32, 32, 3), dtype=np.uint8)
    pixels[..., 0] += (labels * 60).astype(np.uint8)[:, None, None]  # class shows in the red channel
    return CachedImages(pixels, labels, [f"{split}-{seed}-{index}" for index in range(count)], np.array([split] * count), CLASSES)


@pytest.mark.parametrize("name, first_top", [("resnet18", "layer4."), ("tf_efficientnet_lite0", "blocks.6.")])
def test_the_cut_gives_the_models_own_logits_and_names_the_top(name, first_top):
    model = _model(name)
    images = torch.randn(4, 3, 32, 32)
    for layers in ("last-stage", "classification-layer"):
        cut = cut_model(model, layers)
        with torch.no_grad():
            assert torch.allclose(cut.top(cut.bottom(images)), model(images), atol=1e-5)
    top = cut_model(model, "last-stage")
    head = cut_model(model, "classification-layer")
    assert top.trained_names[0].startswith(first_top) and top.trained_names[-2:] == head.trained_names
    assert set(head.trained_names) < set(top.trained_names) <= top.top_state_names
    # Features below the cut are keyed by the bottom's weights only.
    before = frozen_part_fingerprint(model, top)
    with torch.no_grad():
        dict(model.named_parameters())[top.trained_names[0]].add_(1.0)
    assert frozen_part_fingerprint(model, top) == before
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert frozen_part_fingerprint(model, top) != before


def test_two_sites_sums_are_the_pooled_class_weighted_gradient_of_the_top():
    model = _model("resnet18")
    first, second = _images(20, 1), _images(14, 2)
    counts = [int(count) for count in first.class_counts() + second.class_counts()]
    val = _images(9, 3, "val")
    answers = [
        site_top_gradient(model, images, val, counts, device=torch.device("cpu"), precision=FP32) for images in (first, second)
    ]
    cut = cut_model(model, "last-stage")
    summed = sum_answers(answers, cut.trained_names, 3)

    # The same loss over the pooled images, through the whole model in eval mode.
    pooled = np.concatenate([first.images, second.images])
    labels = torch.as_tensor(np.concatenate([first.labels, second.labels]))
    weights = torch.as_tensor(balanced_class_weights(counts), dtype=torch.float32)
    transform = build_eval_transform(*model_normalisation(model))
    inputs = torch.stack([transform(image) for image in torch.as_tensor(pooled).permute(0, 3, 1, 2)])
    model.zero_grad()
    loss = (F.cross_entropy(model(inputs), labels, reduction="none") * weights[labels]).sum()
    loss.backward()
    parameters = dict(model.named_parameters())
    assert summed.loss == pytest.approx(float(loss), rel=1e-4)
    assert summed.summed_image_weight == pytest.approx(float(weights[labels].sum()))
    for name in cut.trained_names:
        assert np.allclose(summed.gradient[name], parameters[name].grad.numpy(), rtol=1e-3, atol=1e-5), name
    assert summed.validation_confusion.sum() == 2 * len(val)  # both sites answered with the same validation images


def test_the_servers_steps_lower_the_federations_loss_and_a_top_worse_on_validation_is_not_handed_on():
    model = _model("resnet18")
    sites = [_images(24, 4), _images(18, 5)]
    counts = [int(count) for count in sites[0].class_counts() + sites[1].class_counts()]
    val = _images(12, 6, "val")
    cut = cut_model(model, "last-stage")
    base = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    losses = []

    def sums_at(values):
        model.load_state_dict({name: torch.as_tensor(value) for name, value in {**base, **values}.items()})
        answers = [site_top_gradient(model, images, val, counts, device=torch.device("cpu"), precision=FP32) for images in sites]
        summed = sum_answers(answers, cut.trained_names, 3)
        losses.append(summed.loss / summed.summed_image_weight)
        return summed

    result = refit_top({name: base[name] for name in cut.trained_names}, sums_at, steps=8, learning_rate=3e-3)
    assert len(losses) == 9 and len(result.validation_balanced_accuracy) == 9
    assert losses[-1] < 0.7 * losses[0]
    assert set(result.layers) == set(cut.trained_names)
    if result.refitted:
        assert any(not np.array_equal(result.layers[name], base[name]) for name in cut.trained_names)

    calls = []

    def worse_every_query(values):
        calls.append(values)
        confusion = np.diag([4, 4, 4]) if len(calls) == 1 else np.array([[4, 0, 0], [4, 0, 0], [4, 0, 0]])
        gradient = {name: np.ones_like(value, dtype=np.float64) for name, value in values.items()}
        return SummedAnswers(1.0, gradient, 10.0, confusion)

    kept = refit_top({name: base[name] for name in cut.trained_names}, worse_every_query, steps=3)
    assert not kept.refitted and all(np.array_equal(kept.layers[name], base[name]) for name in cut.trained_names)


def test_a_site_answer_keeps_no_gradient_on_the_model():
    model = _model("resnet18")
    answer = site_top_gradient(model, _images(10, 7), _images(5, 8, "val"), None, device=torch.device("cpu"), precision=FP32)
    assert isinstance(answer, SiteAnswer) and len(answer.validation_confusion) == 9
    assert all(parameter.grad is None for parameter in model.parameters())


class _ImageSitesGrid(RefitSitesGrid):
    """Sites holding images; they answer the class census and refit queries with the sites' own calls."""

    def __init__(self, model, sites, val) -> None:
        super().__init__(range(1, len(sites) + 1))
        self.model, self.sites, self.val = model, dict(enumerate(sites, start=1)), val

    def class_counts(self, node):
        return self.sites[node].class_counts()

    def refit_answer(self, node, message):
        from shared.config import RoundInstructions
        from shared.top_refit import site_refit_gradient

        instructions = RoundInstructions.model_validate_json(message.content["config"]["instructions"])
        arrays = message.content["arrays"]
        self.model.load_state_dict({name: torch.as_tensor(arrays[name].numpy()) for name in arrays.keys()})
        return site_refit_gradient(instructions.run.federation.refit_layers)(
            self.model, self.sites[node], self.val, instructions.federation_class_counts, device=torch.device("cpu"), precision=FP32
        )


def test_the_server_refits_the_last_stage_from_the_sites_answers_and_hands_on_only_those_layers(monkeypatch):
    from flwr.app import Array, ArrayRecord

    from fake_grid import use_plain_messages
    from server.head_refit import refit_handed_on_layers
    from shared.config import RunConfig
    from shared.weights import model_to_arrays

    use_plain_messages(monkeypatch)
    model = _model("resnet18")
    grid = _ImageSitesGrid(_model("resnet18"), [_images(24, 9), _images(18, 10)], _images(12, 11, "val"))
    before = model_to_arrays(model)
    arrays = ArrayRecord({name: Array(value) for name, value in before.items()})
    run = RunConfig(
        classes=CLASSES, model={"name": "resnet18", "pretrained": "none"},
        federation={"head_refit_steps": 4, "refit_layers": "last-stage"},
    )
    handed_on, refit = refit_handed_on_layers(grid, run, arrays, model)
    assert grid.kinds[:2] == ["query.class_counts"] * 2 and grid.kinds[2:] == ["query.head_gradient"] * 2 * 5
    assert refit["layers"] == "last-stage" and len(refit["validation_balanced_accuracy"]) == 5
    trained = set(cut_model(model, "last-stage").trained_names)
    changed = {name for name in before if not np.array_equal(handed_on[name].numpy(), before[name])}
    assert changed <= trained and (changed or not refit["refitted"])
