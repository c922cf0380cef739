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


class RefitSitesGrid:
    """Sites that answer the class census and refit queries as real sites do; a subclass says what each site holds.

    Subclasses give `class_counts(node)` (a list of per-class training counts) and
    `refit_answer(node, message)` (a `shared.head_refit.SiteAnswer` at the message's model).
    """

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)
        self.kinds: list[str] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

        replies = []
        for message in messages:
            self.kinds.append(message.message_type)
            node = message.metadata.dst_node_id
            counts = [int(count) for count in self.class_counts(node)]
            if message.message_type == "query.class_counts":
                content = RecordDict({"metrics": MetricRecord({"num-examples": sum(counts), "class-counts": counts})})
            else:
                answer = self.refit_answer(node, message)
                content = RecordDict({
                    "metrics": MetricRecord({
                        "num-examples": sum(counts), "head-loss": answer.loss, "head-image-weight": answer.image_weight,
                        "val-confusion-matrix": [int(count) for count in answer.validation_confusion],
                    }),
                    "head-gradient": ArrayRecord({name: Array(value.astype("float32")) for name, value in answer.gradient.items()}),
                })
            replies.append(site_reply(node, content))
        return replies
