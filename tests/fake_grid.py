"""Stand-ins for the server's grid in unit tests: query messages without a Flower run, and site replies from content."""

from types import SimpleNamespace


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
