"""Session store rules (TTL, LRU, quotas, history) and embedding recompute on real Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray

from atelier3d.errors import NotFound, TooManyRequests
from atelier3d.samples import drawn_character
from atelier3d.serve.sessions.memory import MemorySessionStore
from atelier3d.serve.sessions.session import SegObject, Step
from tests.helpers import png_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock, **kw) -> MemorySessionStore:
    return MemorySessionStore(**{"ttl_s": 60, "max_sessions": 3, "max_per_client": 2,
                                 "clock": clock,
                           **kw})


IMAGE = np.zeros((4, 4, 3), np.uint8)


def test_ttl_expiry_is_idle_time():
    clock = Clock()
    s = store(clock)
    a = s.add("c1", IMAGE)
    clock.now += 50
    assert s.get(a.session_id) is a  # touching refreshes the TTL
    clock.now += 50
    assert s.expires_in(a) == pytest.approx(10)
    clock.now += 11
    with pytest.raises(NotFound):
        s.get(a.session_id)
    assert len(s) == 0


def test_lru_eviction_and_per_client_quota():
    clock = Clock()
    s = store(clock, max_per_client=5)
    ids = [s.add(f"c{i}", IMAGE).session_id for i in range(3)]
    s.get(ids[0])  # most recently used now
    s.add("c9", IMAGE)
    with pytest.raises(NotFound):
        s.get(ids[1])  # the least recently used went
    assert s.get(ids[0]) and s.get(ids[2])
    quota = store(Clock(), max_per_client=2)
    quota.add("x", IMAGE)
    quota.add("x", IMAGE)
    with pytest.raises(TooManyRequests):
        quota.add("x", IMAGE)
    quota.add("y", IMAGE)


def test_ids_are_unguessable():
    s = store(Clock(), max_sessions=1000, max_per_client=1000)
    ids = {s.add("c", IMAGE).session_id for _ in range(200)}
    assert len(ids) == 200 and all(len(i) >= 24 for i in ids)


def step(n: int) -> Step:
    return Step(points=[(n, n)], labels=[1], box=None, candidates=[], low_res=None, selected=0)


def test_history_is_bounded_and_redo_branch_drops():
    obj = SegObject("o", max_history=3)
    for n in range(5):
        obj.push(step(n))
    assert [s.points[0][0] for s in obj.steps] == [2, 3, 4] and obj.cursor == 3
    obj.undo()
    obj.undo()
    assert obj.current.points[0][0] == 2
    obj.push(step(9))
    assert [s.points[0][0] for s in obj.steps] == [2, 9]
    obj.undo()
    obj.undo()
    obj.undo()  # past the start stays at empty
    assert obj.cursor == 0 and obj.current is None
    obj.reset()  # resetting an empty object adds no step
    assert obj.cursor == 0


def test_evicted_embedding_is_recomputed(http):
    """The test app keeps 2 embeddings resident; a third session pushes the first one out."""
    images = [drawn_character(160 + 16 * i, 256) for i in range(3)]
    sids = []
    first = None
    for i, image in enumerate(images):
        r = http.post("/v1/sessions?wait=true", files={"image": ("c.png", png_bytes(image))})
        sids.append(r.json()["session_id"])
        if i == 0:
            first = http.post(f"/v1/sessions/{sids[0]}/segment",
                              json={"points": [[80, 128]], "labels": [1]}).json()
    assert http.get(f"/v1/sessions/{sids[0]}").json()["embedding"] == "pending"
    again = http.post(f"/v1/sessions/{sids[0]}/segment",
                      json={"points": [[80, 128]], "labels": [1]})
    assert again.status_code == 200
    assert again.json()["masks"] == first["masks"]
    assert again.json()["timings_ms"]["wait_embedding_ms"] > 0
    assert http.get(f"/v1/sessions/{sids[0]}").json()["embedding"] == "ready"
    for sid in sids:
        http.delete(f"/v1/sessions/{sid}")


@ray.remote
class Owner:
    """Owns an object, then dies: what a lost node or a dead owner does to an embedding."""

    def put(self, value):
        return [ray.put(value)]


async def test_lost_embedding_object_is_recomputed(server):
    """A session whose embedding object died with its owner still segments, after a re-encode."""
    from ray import serve

    from atelier3d.api.segment import SegmentRequest
    from atelier3d.config import AppConfig
    from atelier3d.serve.segment.service import SegmentService

    encoder = serve.get_deployment_handle("SamEncoder", "atelier3d")
    decoder = serve.get_deployment_handle("SamDecoder", "atelier3d")
    service = SegmentService(AppConfig(models="tiny"), encoder, decoder)
    info = await service.create_session(png_bytes(drawn_character(160, 256)), "test")
    await service.wait_ready(info.session_id)
    request = SegmentRequest(points=[(80, 128)], labels=[1])
    before = await service.segment(info.session_id, request)

    session = service.store.get(info.session_id)
    embedding = await asyncio.to_thread(ray.get, session.embedding_ref)
    owner = Owner.remote()
    [orphan] = await owner.put.remote(embedding)
    ray.kill(owner)
    await asyncio.sleep(1.0)
    with pytest.raises(ray.exceptions.ObjectLostError):
        await asyncio.to_thread(ray.get, orphan, timeout=30)
    session.embedding_ref = orphan  # the session now points at a lost object

    after = await service.segment(info.session_id, request)
    assert after.masks == before.masks
    assert session.embedding_ref is not orphan
    await service.delete_session(info.session_id)
