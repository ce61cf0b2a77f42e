"""The sessions' Redis behind a password that comes from the Gateway replica's environment
(``sessions.redis_password_env``; k8s: a Secret), as k8s/redis.yaml runs it."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import redis.exceptions

from atelier3d.config import AppConfig
from atelier3d.serve.sessions import build_store
from tests.conftest import redis_server
from tests.helpers import png_bytes

IMAGE = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
ENV = "ATELIER3D_TEST_REDIS_PASSWORD"


def config(url: str, password_env: str | None) -> AppConfig:
    return AppConfig.model_validate({"sessions": {
        "backend": "redis", "redis_url": url, "redis_password_env": password_env,
        "redis_prefix": f"test-{secrets.token_hex(4)}"}})


async def test_sessions_reach_a_redis_with_the_password_the_environment_holds(monkeypatch):
    password = secrets.token_hex(16)
    with redis_server("--requirepass", password) as url:
        monkeypatch.setenv(ENV, password)
        store = build_store(config(url, ENV))
        try:
            session = await store.create("client", IMAGE, png_bytes(IMAGE))
            assert np.array_equal((await store.load(session.session_id)).image, IMAGE)
            # job events and cancels go through pub/sub on the same client's connections
            pubsub = store.redis.pubsub()
            await pubsub.subscribe("events")
            assert await store.redis.publish("events", "e1") == 1
            messages = [await pubsub.get_message(timeout=5) for _ in range(2)]
            assert [m["data"] for m in messages if m and m["type"] == "message"] == [b"e1"]
            await pubsub.aclose()
        finally:
            await store.redis.aclose()

        # the same Redis refuses a store without the password
        bare = build_store(config(url, None))
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await bare.create("client", IMAGE, png_bytes(IMAGE))
        finally:
            await bare.redis.aclose()

        # a name that the replica's environment lacks fails its start, saying which
        monkeypatch.delenv(ENV)
        with pytest.raises(ValueError, match=f"redis_password_env is '{ENV}'"):
            build_store(config(url, ENV))
