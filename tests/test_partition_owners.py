"""Partition ownership: a repeated partition is refused while its owner is online, and
given back when the owner fails or goes offline."""

import pytest

from app.partition_owners import PartitionOwners

pytestmark = pytest.mark.unit


def test_the_first_node_to_answer_owns_a_partition_and_a_repeat_is_held_back():
    owners = PartitionOwners()
    online = {11, 12, 13}
    assert owners.claim(11, 1, online) is None
    assert owners.claim(12, 2, online) is None
    assert owners.claim(13, 1, online) == 11
    assert owners.held_back(online) == {13}
    assert owners.claim(11, 1, online) is None, "the owner answering again is no repeat"


def test_a_repeat_takes_the_partition_over_once_the_owner_is_offline():
    owners = PartitionOwners()
    owners.claim(11, 1, {11, 13})
    assert owners.claim(13, 1, {11, 13}) == 11
    assert owners.held_back({13}) == set(), "node 11 went offline: node 13 may be sampled again"
    assert owners.claim(13, 1, {13}) is None
    assert owners.claim(11, 1, {11, 13}) == 13, "the old owner, back online, is now the repeat"


def test_a_node_that_failed_gives_its_partition_up():
    """A SuperNode killed and restarted rejoins under a new id while Flower still counts the
    dead id online; the dead id's failure must not cost the restarted node its partition."""
    owners = PartitionOwners()
    owners.claim(11, 1, {11})
    owners.release(11)
    assert owners.claim(21, 1, {11, 21}) is None
    assert owners.held_back({11, 21}) == set()
