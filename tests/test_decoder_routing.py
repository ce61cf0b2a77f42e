"""A session's clicks go to the SamDecoder replica that holds its embedding.

SamDecoder with two replicas on a real local Ray (in its own process: the ``server`` fixture
owns this one's Ray); several sessions' embeddings clicked in turns, each click sent as the
Gateway sends it. Each embedding must be fetched from the object store by one replica, once;
without routing by embedding each session's clicks would spread over both and each would fetch
it.
"""

from __future__ import annotations

import sys

import pytest

from benchmarks.decoder_routing import MARKER, measure
from tests.helpers import print_report, run_driver

pytestmark = pytest.mark.cluster

SESSIONS, CLICKS = 6, 5


def test_each_embedding_is_fetched_by_one_replica(tiny_dir):
    report = run_driver("tests.test_decoder_routing", str(tiny_dir), marker=MARKER,
                        timeout_s=600)
    fetched = report["fetches_by_replica"]
    assert len(fetched) == 2
    assert report["embeddings_fetched"] == SESSIONS
    assert report["max_replicas_per_embedding"] == 1, fetched
    assert report["embedding_fetches"] == SESSIONS, fetched  # once each: the rest were hits
    assert report["embedding_hits"] == SESSIONS * (CLICKS - 1)


if __name__ == "__main__":
    print_report(MARKER, measure(2, SESSIONS, CLICKS, sys.argv[1]))
