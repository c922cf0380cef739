"""Stand-ins for the server's side of a query in unit tests: messages without a Flower run, site replies, a model over given features."""

from types import SimpleNamespace

from torch import nn


class FeatureClassifier(nn.Module):
    """A linear classifier over given features (the frozen part is the identity), named as timm names its layer."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(num_features, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, features):
        return self.classifier(features)


def use_plain_messages(monkeypatch) -> None:
    """Let the server build query messages outside a Flower run (Flower's Message needs one)."""
    monkeypatch.setattr(
        "server.site_queries.Message",
        lambda content, dst_node_id, message_type: SimpleNamespace(
            content=content, metadata=SimpleNamespace(dst_node_id=dst_node_id), message_type=message_type
        ),
    )


def site_reply(node: int, content) -> SimpleNamespace:
    """A site's successful reply holding `content` (a RecordDict)."""
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False)


def error_reply(node: int, reason: str) -> SimpleNamespace:
    """A site's error reply."""
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: True, error=SimpleNamespace(reason=reason))
