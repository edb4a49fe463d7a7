"""Model-publish notifications: activating a version tells every gateway worker to swap its ORT session.

With Redis, activation is published on a pub/sub channel and each worker reacts at once; without it (or if
a message is missed) each worker re-reads the active version every `model_poll_s` seconds.
"""
from __future__ import annotations

import asyncio
import json
import logging

import redis
import redis.asyncio as aioredis

from app.db import session_scope
from app.services.model_registry import ServedModels, active_versions
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
CHANNEL = "privface:model-activated"


def publish_activation(redis_url: str | None, version: str) -> int:
    """Announce the new active version; returns how many workers heard it (0 without Redis)."""
    if not redis_url:
        return 0
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.publish(CHANNEL, json.dumps({"version": version})))
    finally:
        client.close()


async def sync_active_model(sessions: sessionmaker[Session], models: ServedModels) -> str | None:
    """Serve whatever the registry says is active, for every preset (loading off the event loop); returns the
    default preset's active version."""
    with session_scope(sessions) as session:
        rows = active_versions(session)
        for row in rows.values():
            session.expunge(row)
    served = models.active_by_preset
    for preset, row in rows.items():
        if served.get(preset) != row.version:
            await asyncio.to_thread(models.switch_to, row)
    return models.active_version


async def watch_model_activations(sessions: sessionmaker[Session], models: ServedModels, redis_url: str | None,
                                  poll_s: float) -> None:
    """Run forever: swap on each published activation, and re-check the registry every `poll_s`."""
    pubsub = None
    if redis_url:
        client = aioredis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe(CHANNEL)
    try:
        while True:
            if pubsub is not None:
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
            else:
                await asyncio.sleep(poll_s)
            try:
                await sync_active_model(sessions, models)
            except Exception:  # a bad model file must not kill the watcher; the old session keeps serving
                log.exception("could not switch to the newly active model")
    finally:
        if pubsub is not None:
            await pubsub.aclose()
