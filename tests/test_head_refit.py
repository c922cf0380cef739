"""The classification layer's refit: closed-form gradients the sites sum, the server's steps, config and the site's refusal."""

import numpy as np
import pytest
import torch
from torch import nn

from fake_grid import FeatureClassifier, RefitSitesGrid, error_reply, use_plain_messages
from shared.errors import ConfigError, ModelError
from shared.head_refit import (
    HEAD_REFIT_STEPS,
    FederationGradient,
    balanced_class_weights,
    confusion_counts,
    head_parameter_names,
    refit_head,
    summed_head_gradient,
)
from shared.models.model_cut import cut_model

CLASSES = ["a", "b", "c"]


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes of 2-D features, class c (index 2) rare."""
    generator = torch.Generator().manual_seed(seed)
    counts = [60, 60, 6]
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    features = torch.cat([centres[label] + torch.randn(count, 2, generator=generator) for label, count in enumerate(counts)])
    labels = torch.cat([torch.full((count,), label) for label, count in enumerate(counts)])
    return features, labels


def test_class_weights_give_every_present_class_the_same_total():
    weights = balanced_class_weights([3, 1, 0])
    assert weights.tolist() == pytest.approx([4 / 6, 2.0, 0.0])
    assert weights[0] * 3 == pytest.approx(weights[1] * 1)


def test_the_closed_form_gradient_is_autograds_and_two_sites_sum_to_the_pooled_one():
    features, labels = _features()
    weights = balanced_class_weights(np.bincount(labels.numpy(), minlength=3))
    weight, bias = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    pooled_loss, pooled_weight, pooled_bias, pooled_total = summed_head_gradient(weight, bias, features, labels, weights)

    leaf_weight, leaf_bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    losses = nn.functional.cross_entropy(features.double() @ leaf_weight.T + leaf_bias, labels, reduction="none")
    summed = (losses * torch.as_tensor(weights)[labels]).sum()
    summed.backward()
    assert pooled_loss == pytest.approx(float(summed))
    assert pooled_weight == pytest.approx(leaf_weight.grad.numpy(), abs=1e-9)
    assert pooled_bias == pytest.approx(leaf_bias.grad.numpy(), abs=1e-9)
    assert pooled_total == pytest.approx(float(torch.as_tensor(weights)[labels].sum()))

    halves = [summed_head_gradient(weight, bias, features[part::2], labels[part::2], weights) for part in (0, 1)]
    assert sum(half[0] for half in halves) == pytest.approx(pooled_loss)
    assert sum(half[1] for half in halves) == pytest.approx(pooled_weight, abs=1e-9)
    assert sum(half[2] for half in halves) == pytest.approx(pooled_bias, abs=1e-9)
    with pytest.raises(ModelError, match="do not fit"):
        summed_head_gradient(weight, bias, torch.zeros(2, 5), labels[:2], weights)


def test_the_confusion_counts_rows_are_true_classes():
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 0]])
    assert confusion_counts(logits, torch.tensor([0, 1, 1]), 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]


def _sites_gradient(sites, validation, weights):
    """What the server sums from sites holding `sites` (features, labels) and the pooled `validation`."""

    def gradient_at(weight, bias):
        answers = [summed_head_gradient(torch.as_tensor(weight), torch.as_tensor(bias), x, y, weights) for x, y in sites]
        logits = validation[0].double() @ torch.as_tensor(weight, dtype=torch.float64).T + torch.as_tensor(bias, dtype=torch.float64)
        return FederationGradient(
            *(sum(answer[part] for answer in answers) for part in range(4)), confusion_counts(logits, validation[1], 3)
        )

    return gradient_at


def test_the_refit_undoes_a_layer_that_ignores_the_rare_class():
    features, labels = _features(0)
    validation = _features(1)
    # Skewed sites: one holds classes a and c, the other b (as natural hospitals do).
    sites = [(features[labels != 1], labels[labels != 1]), (features[labels == 1], labels[labels == 1])]
    weights = balanced_class_weights(np.bincount(labels.numpy(), minlength=3))
    weight = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    bias = np.array([0.0, 0.0, -5.0], dtype=np.float32)  # class c is never predicted
    calls = []
    gradient_at = _sites_gradient(sites, validation, weights)
    result = refit_head(weight, bias, lambda *layer: calls.append(layer) or gradient_at(*layer), steps=20)
    scores = result.validation_balanced_accuracy
    assert len(scores) == len(calls) <= 23 and scores[0] < 0.7  # class c is never predicted at first
    assert result.refitted and scores[-1] > 0.95
    assert np.array_equal(calls[-1][0], result.weight) and np.array_equal(calls[-1][1], result.bias)
    logits = validation[0] @ torch.as_tensor(result.weight).T + torch.as_tensor(result.bias)
    assert confusion_counts(logits, validation[1], 3)[2, 2] >= 5  # the rare class is found


def test_a_refit_worse_on_validation_than_the_trained_layer_is_not_handed_on():
    calls = []

    def worse_every_query(weight, bias):
        calls.append((weight.copy(), bias.copy()))
        right = max(10 - len(calls), 0)  # validation images found: 9 at the trained layer, fewer at every later query
        confusion = np.array([[right, 10 - right, 0], [0, 10, 0], [0, 0, 10]])
        return FederationGradient(float((weight**2).sum()), 2 * weight.astype(np.float64), np.ones(3), 30.0, confusion)

    weight, bias = np.arange(6, dtype=np.float32).reshape(3, 2), np.zeros(3, dtype=np.float32)
    result = refit_head(weight, bias, worse_every_query, steps=4)
    assert not result.refitted
    assert np.array_equal(result.weight, weight) and np.array_equal(result.bias, bias)
    assert not np.array_equal(calls[-1][0], weight)  # the refit did move the layer
    assert result.validation_balanced_accuracy[0] > result.validation_balanced_accuracy[-1]


def test_a_query_without_weighted_images_is_refused():
    empty = FederationGradient(0.0, np.zeros((3, 2)), np.zeros(3), 0.0, np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ModelError, match="no weighted training images"):
        refit_head(np.zeros((3, 2)), np.zeros(3), lambda weight, bias: empty, steps=3)


def test_the_refit_is_on_by_default_off_in_private_runs_and_refused_when_asked_for_there():
    from shared.config import RunConfig, run_config_from_flower

    plain = RunConfig(classes=CLASSES)
    assert plain.head_refit_steps() == HEAD_REFIT_STEPS
    assert RunConfig(classes=CLASSES, federation={"head_refit_steps": 0}).head_refit_steps() == 0
    private = {"mode": "local", "target_epsilon": 8.0}
    assert RunConfig(classes=CLASSES, privacy=private, train={"balance": "none"}).head_refit_steps() == 0
    # The automatic choice follows the privacy setting of a copy, too.
    copied = plain.model_copy(update={"privacy": plain.privacy.model_copy(update={"mode": "central", "noise_multiplier": 1.0, "max_grad_norm": 1.0})})
    assert RunConfig.model_validate(copied.model_dump()).head_refit_steps() == 0
    with pytest.raises(ValueError, match="head_refit_steps 0"):
        RunConfig(classes=CLASSES, privacy=private, train={"balance": "none"}, federation={"head_refit_steps": 5})
    assert run_config_from_flower({"head-refit-steps": -1}).head_refit_steps() == HEAD_REFIT_STEPS
    assert run_config_from_flower({"head-refit-steps": 7}).head_refit_steps() == 7


def test_head_names_come_from_the_model_and_a_model_without_a_linear_head_is_refused():
    from shared.config import ModelConfig
    from shared.models.classifier import build_classifier

    model = build_classifier(ModelConfig(name="resnet18", pretrained="none"), num_classes=3)
    assert head_parameter_names(model) == ("fc.weight", "fc.bias")
    with pytest.raises(ModelError, match="head_refit_steps 0"):
        head_parameter_names(nn.Sequential(nn.ReLU()))
    with pytest.raises(ModelError, match="refit-layers"):
        cut_model(FeatureClassifier(2, 3), "last-stage")


class _SitesGrid(RefitSitesGrid):
    """Sites holding 2-D features; they answer the class census and head-gradient queries as real sites do."""

    def __init__(self, sites) -> None:
        super().__init__(range(1, len(sites) + 1))
        self.sites = dict(enumerate(sites, start=1))

    def class_counts(self, node):
        return np.bincount(self.sites[node][1].numpy(), minlength=3)

    def refit_answer(self, node, message):
        from shared.config import RoundInstructions
        from shared.head_refit import SiteAnswer

        features, labels, val_features, val_labels = self.sites[node]
        weights = balanced_class_weights(RoundInstructions.model_validate_json(message.content["config"]["instructions"]).federation_class_counts)
        arrays = message.content["arrays"]
        weight, bias = (torch.from_numpy(arrays[name].numpy()) for name in ("classifier.weight", "classifier.bias"))
        loss, gradient_weight, gradient_bias, total = summed_head_gradient(weight, bias, features, labels, weights)
        confusion = confusion_counts(val_features @ weight.T + bias, val_labels, 3)
        gradient = {"classifier.weight": gradient_weight, "classifier.bias": gradient_bias}
        return SiteAnswer(loss, gradient, total, confusion.ravel().tolist())


def test_the_server_takes_the_census_then_queries_the_sites_and_hands_on_the_refitted_layer(monkeypatch):
    from flwr.app import Array, ArrayRecord

    from server.head_refit import refit_handed_on_layers
    from shared.config import RunConfig
    from shared.weights import model_to_arrays

    use_plain_messages(monkeypatch)
    features, labels = _features(0)
    val_features, val_labels = _features(1)
    grid = _SitesGrid([
        (features[labels != 1], labels[labels != 1], val_features[val_labels != 1], val_labels[val_labels != 1]),
        (features[labels == 1], labels[labels == 1], val_features[val_labels == 1], val_labels[val_labels == 1]),
    ])
    model = FeatureClassifier(2, 3)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, -5.0]))
    arrays = ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()})
    run = RunConfig(classes=CLASSES, federation={"head_refit_steps": 10})
    refitted, refit = refit_handed_on_layers(grid, run, arrays, model)
    assert grid.kinds[:2] == ["query.class_counts"] * 2
    queries = len(refit["validation_balanced_accuracy"])
    assert 2 <= queries <= 13 and grid.kinds[2:] == ["query.head_gradient"] * 2 * queries
    scores = refit["validation_balanced_accuracy"]
    assert scores[0] < 0.7 and refit["refitted"] and scores[-1] > 0.9
    assert refitted["classifier.bias"].numpy()[2] > -5.0


class _SilentGrid:
    """Sites that fail every query."""

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        return [error_reply(message.metadata.dst_node_id, "site error") for message in messages]


def test_without_answers_the_run_hands_on_the_layer_as_trained(monkeypatch):
    from flwr.app import Array, ArrayRecord

    from server.head_refit import refit_handed_on_layers
    from shared.config import RunConfig
    from shared.weights import model_to_arrays

    use_plain_messages(monkeypatch)
    model = FeatureClassifier(2, 3)
    arrays = ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()})
    handed_on, refit = refit_handed_on_layers(_SilentGrid(), RunConfig(classes=CLASSES), arrays, model)
    assert handed_on is arrays and refit is None


class _HandlerApp:
    """Collects the query handlers a ClientApp would register."""

    def __init__(self) -> None:
        self.handlers = {}

    def query(self, action):
        def register(function):
            self.handlers[action] = function
            return function

        return register


def test_a_site_sends_no_head_gradient_in_a_private_run(monkeypatch):
    from types import SimpleNamespace

    from client import model_queries
    from shared.config import RunConfig

    run = RunConfig(classes=CLASSES, privacy={"mode": "local", "target_epsilon": 8.0}, train={"balance": "none"})
    read = []
    received = SimpleNamespace(unpack=lambda: (None, run, None, None, None, None))
    monkeypatch.setattr(model_queries, "receive", lambda message, context, source: received)
    monkeypatch.setattr(model_queries, "round_training_images", lambda *args: read.append(args))
    app = _HandlerApp()
    model_queries.register_model_queries(app, source=None)
    with pytest.raises(ConfigError, match="not accounted"):
        app.handlers["head_gradient"](None, None)
    assert not read, "the site read its images before refusing"


def test_the_sites_answers_add_up_tensor_by_tensor():
    from shared.head_refit import SiteAnswer, sum_answers

    answers = [
        SiteAnswer(1.5, {"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}, 2.0, [1, 0, 0, 0, 1, 0, 0, 0, 1]),
        SiteAnswer(0.5, {"w": 2 * np.ones((3, 2), np.float32), "b": np.zeros(3, np.float32)}, 3.0, [0, 1, 0, 0, 1, 0, 0, 0, 0]),
    ]
    summed = sum_answers(answers, ("w", "b"), 3)
    assert summed.loss == 2.0 and summed.summed_image_weight == 5.0
    assert summed.gradient["w"].tolist() == [[3.0, 3.0]] * 3 and summed.gradient["b"].tolist() == [1.0, 1.0, 1.0]
    assert summed.validation_confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
