"""`privface worker` stops promptly on SIGTERM (app/services/rq_worker.py says why rq's own teardown could hang).

Real Redis, no mocks: the racy schedule is forced by letting the listener read the unsubscribe confirmation
before the teardown goes on, the order in which rq 3.0 + redis-py 8.2 waited a minute (rq's Worker put in the
same schedule does; checked by hand when this was written)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from app.services.rq_worker import PromptStopWorker
from common.paths import PROJECT_ROOT as ROOT
from tests.test_mpc_restart import wait_for


def test_teardown_ends_when_the_listener_has_read_the_unsubscribe_first(redis_url):
    for _ in range(5):
        worker = PromptStopWorker(["privface-teardown-test"], connection=redis.Redis.from_url(redis_url))
        worker.subscribe()
        pubsub = worker.pubsub
        assert wait_for(lambda: pubsub.subscribed, timeout=5, pause=0.01), "the listener never saw its subscription"
        unsubscribe = pubsub.unsubscribe

        def unsubscribe_and_let_the_listener_read_it(*args):
            result = unsubscribe(*args)
            assert wait_for(lambda: not pubsub.subscribed, timeout=5, pause=0.01), "the listener never read the confirmation"
            return result

        pubsub.unsubscribe = unsubscribe_and_let_the_listener_read_it
        teardown = threading.Thread(target=worker.unsubscribe, daemon=True)
        started = time.monotonic()
        teardown.start()
        teardown.join(timeout=10)
        assert not teardown.is_alive(), "the teardown waits on the listener (rq's own order hangs here for 60 s)"
        assert time.monotonic() - started < 5 and not worker.pubsub_thread.is_alive()


def test_a_sigterm_stops_an_idle_worker_process_at_once_and_it_deregisters(redis_url, tmp_path: Path):
    env = {**os.environ, "PRIVFACE_ENV": "test", "PRIVFACE_REDIS_URL": redis_url,
           "PRIVFACE_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}", "PRIVFACE_SECRET_KEY": "k" * 40}
    subprocess.run([sys.executable, "-m", "privface", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "privface", "worker"], cwd=ROOT, env=env,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    connection = redis.Redis.from_url(redis_url)
    try:
        assert wait_for(lambda: b"Listening on" in log.read_bytes(), timeout=60), log.read_text()
        assert connection.scard("rq:workers") == 1
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.wait(timeout=20) == 0, log.read_text()
        assert time.monotonic() - started < 10, log.read_text()
        assert connection.scard("rq:workers") == 0, "a stopped worker takes its registration with it"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
