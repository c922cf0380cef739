"""The coordinator's grid collects the sites' replies within a fraction of a second, not Flower's fixed 3 s."""

import time

import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.serverapp import Grid

from server.prompt_grid import PromptGrid


def _reply_to(message_id: str) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"reply-{message_id}", src_node_id=5, dst_node_id=0, reply_to_message_id=message_id,
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )
    return Message(content=RecordDict({"site": ConfigRecord({"name": message_id})}), metadata=metadata)


class SitesReplyingAfter(Grid):
    """A SuperLink seen through the Grid interface: each site's reply can be pulled `delays` seconds after the push."""

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = delays
        self.pushed_at = 0.0
        self.pulls = 0

    def set_run(self, run) -> None:
        self.run_set = run

    @property
    def run(self):
        return "the run"

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self):
        return [5, 6]

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return list(self.delays)

    def pull_messages(self, message_ids):
        self.pulls += 1
        elapsed = time.monotonic() - self.pushed_at
        return [_reply_to(message_id) for message_id in message_ids if self.delays[message_id] <= elapsed]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid runs its own send-and-receive loop")


def test_replies_are_collected_shortly_after_the_last_one_arrives():
    sites = SitesReplyingAfter({"a": 0.3, "b": 0.6})
    started = time.monotonic()
    replies = PromptGrid(sites, pull_interval_s=0.05).send_and_receive([], timeout=30)
    waited = time.monotonic() - started
    assert sorted(reply.metadata.reply_to_message_id for reply in replies) == ["a", "b"]
    # Flower's own loop would return at 3 s (its first check after the last reply).
    assert 0.6 <= waited < 2.0
    assert sites.pulls >= 3


def test_a_site_that_never_answers_is_given_up_at_the_timeout():
    sites = SitesReplyingAfter({"a": 0.1, "silent": 1e9})
    started = time.monotonic()
    replies = PromptGrid(sites, pull_interval_s=0.05).send_and_receive([], timeout=0.5)
    assert [reply.metadata.reply_to_message_id for reply in replies] == ["a"]
    assert 0.5 <= time.monotonic() - started < 2.0


def test_everything_else_is_the_wrapped_grids():
    sites = SitesReplyingAfter({})
    grid = PromptGrid(sites)
    grid.set_run("run 7")
    assert sites.run_set == "run 7" and grid.run == "the run" and list(grid.get_node_ids()) == [5, 6]
    with pytest.raises(ValueError, match="must be positive"):
        PromptGrid(sites, pull_interval_s=0)
