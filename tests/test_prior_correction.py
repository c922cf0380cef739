"""Class-prior correction: the soft confusion, the offset step, the fit that balances predictions, and folding into the head."""

import numpy as np
import pytest
import torch
from torch import nn

from fake_grid import FeatureClassifier, site_reply, use_plain_messages
from shared.errors import ModelError
from shared.metrics import classification_metrics
from shared.prior_correction import MAX_OFFSET, PRIOR_STEPS, fold_offsets, offset_step, soft_confusion


def _skewed_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Informative logits of 3 classes (150 images each) with class 2 pushed down by 3, as on an averaged model."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(150)
    clean = torch.nn.functional.one_hot(labels, 3).float() * 2.0 + torch.randn(450, 3, generator=generator)
    return clean + torch.tensor([0.0, 0.0, -3.0]), clean, labels


def test_the_soft_confusion_sums_each_true_classs_probabilities_and_sites_add_up():
    logits, labels = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 0, 1])
    expected = np.array([[0.5 + np.exp(2) / (1 + np.exp(2)), 0.5 + 1 / (1 + np.exp(2))], [0.5, 0.5]])
    assert soft_confusion(logits, labels) == pytest.approx(expected)
    assert soft_confusion(logits[:2], labels[:2]) + soft_confusion(logits[2:], labels[2:]) == pytest.approx(expected)
    assert soft_confusion(logits, labels, np.array([0.0, 100.0]))[:, 1] == pytest.approx([2.0, 1.0])


def test_one_step_raises_an_under_predicted_class_and_keeps_offsets_centred():
    # Each class is predicted 0.6 / 0.3 / 0.1 of the time on average (rows: 10 images of each class).
    summed = np.array([[6.0, 3.0, 1.0], [6.0, 3.0, 1.0], [6.0, 3.0, 1.0]])
    step = offset_step(summed, np.zeros(3))
    raw = np.log(1 / 3) - np.log([0.6, 0.3, 0.1])
    assert step == pytest.approx(raw - raw.mean())
    # A class without validation images keeps its offset and takes no part in the centring.
    summed[2] = 0.0
    kept = offset_step(summed, np.array([0.0, 0.0, 0.7]))
    assert kept[2] == pytest.approx(0.7) and kept[:2].mean() == pytest.approx(0.0)
    with pytest.raises(ModelError, match="same skin-fl version"):
        offset_step(summed[:2], np.zeros(3))


def test_the_fit_undoes_a_pushed_down_class_and_restores_balanced_accuracy():
    skewed, clean, labels = _skewed_logits()
    offsets = np.zeros(3)
    for _ in range(PRIOR_STEPS):
        offsets = offset_step(soft_confusion(skewed, labels, offsets), offsets)
    assert offsets[2] - offsets[:2].mean() == pytest.approx(3.0, abs=0.5)
    assert np.abs(offsets).max() <= MAX_OFFSET
    classes = ["a", "b", "c"]
    before = classification_metrics(labels.numpy(), skewed.softmax(1).numpy(), classes)["balanced_accuracy"]
    after = classification_metrics(labels.numpy(), (skewed + torch.tensor(offsets).float()).softmax(1).numpy(), classes)
    reference = classification_metrics(labels.numpy(), clean.softmax(1).numpy(), classes)["balanced_accuracy"]
    assert before < reference - 0.15
    assert after["balanced_accuracy"] == pytest.approx(reference, abs=0.03)


def test_folding_adds_the_offsets_to_the_logits():
    model = nn.Sequential(nn.Linear(4, 3))
    model.get_classifier = lambda: model[0]
    inputs = torch.randn(5, 4)
    before = model(inputs).detach()
    fold_offsets(model, np.array([0.5, -0.25, 0.0]))
    assert torch.allclose(model(inputs).detach(), before + torch.tensor([0.5, -0.25, 0.0]), atol=1e-6)
    with pytest.raises(ModelError, match="linear classification layer"):
        fold_offsets(nn.Sequential(nn.ReLU()), np.zeros(3))


class _SitesGrid:
    """Two sites with validation features; each answers a prior query with the sent model's soft confusion."""

    def __init__(self, sites: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.sites = dict(enumerate(sites, start=1))
        self.queries = 0

    def get_node_ids(self):
        return list(self.sites)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import MetricRecord, RecordDict

        self.queries += 1
        replies = []
        for message in messages:
            features, labels = self.sites[message.metadata.dst_node_id]
            arrays = message.content["arrays"]
            weight, bias = (torch.from_numpy(arrays[name].numpy()) for name in ("classifier.weight", "classifier.bias"))
            sums = soft_confusion(features @ weight.T + bias, labels).ravel().tolist()
            content = RecordDict({"metrics": MetricRecord({"num-examples": len(labels), "val-soft-confusion": sums})})
            replies.append(site_reply(message.metadata.dst_node_id, content))
        return replies


def test_the_server_folds_the_offsets_its_sites_soft_confusion_gives(monkeypatch):
    from flwr.app import Array, ArrayRecord

    from server.prior_correction import correct_class_prior
    from shared.config import RunConfig
    from shared.weights import model_to_arrays

    use_plain_messages(monkeypatch)
    skewed, _, labels = _skewed_logits()
    model = FeatureClassifier(3, 3)
    with torch.no_grad():  # identity weights: the features are the skewed logits themselves
        model.classifier.weight.copy_(torch.eye(3))
        model.classifier.bias.zero_()
    arrays = ArrayRecord({name: Array(value) for name, value in model_to_arrays(model).items()})
    grid = _SitesGrid([(skewed[::2], labels[::2]), (skewed[1::2], labels[1::2])])
    corrected, offsets = correct_class_prior(grid, RunConfig(classes=["a", "b", "c"]), arrays, model)
    assert grid.queries == PRIOR_STEPS
    # The same steps on the pooled logits: summing the sites' soft confusion is the pooled soft confusion.
    expected = np.zeros(3)
    for _ in range(PRIOR_STEPS):
        expected = offset_step(soft_confusion(skewed, labels, expected), expected)
    assert offsets == pytest.approx(expected.tolist(), abs=1e-6)
    assert corrected["classifier.bias"].numpy() == pytest.approx(expected, abs=1e-5)
    assert offsets[2] > 1.5  # the pushed-down class is raised
