"""Shared test fixtures: data location, real PostgreSQL/Redis, free ports, and real privface processes."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.paths import shared_dir  # noqa: F401  (re-exported for tests)
from devtools.net import free_port  # noqa: F401  (re-exported for tests)

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PRIVFACE_ENV", "test")


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "datasets").is_dir():
        pytest.skip(f"shared data not found at {path} (set PRIVFACE_SHARED_DIR)")
    return path


POSTGRES_ADMIN = os.environ.get("PRIVFACE_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=test")
REDIS_URL = os.environ.get("PRIVFACE_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def postgres_db() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases (real server), all dropped afterwards."""
    yield from _databases()


@pytest.fixture(scope="module")
def module_postgres_db() -> Iterator[Callable[[], str]]:
    """The same factory for a stack that the tests of one module share (one stack start instead of one each)."""
    yield from _databases()


def _databases() -> Iterator[Callable[[], str]]:
    import psycopg

    names: list[str] = []

    def create() -> str:
        name = "pf_test_" + uuid.uuid4().hex[:12]
        try:
            admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            pytest.fail(f"PostgreSQL is not reachable ({exc}); run scripts/services.sh")
        with admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    yield create
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_db) -> str:
    """One fresh, empty PostgreSQL database."""
    return postgres_db()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis database number of its own, flushed before and after."""
    yield from _redis_database(0)


@pytest.fixture(scope="module")
def module_redis_url() -> Iterator[str]:
    """The same, for a stack shared by the tests of one module: another database number than `redis_url`'s, so
    a test's flush never empties the shared stack's."""
    yield from _redis_database(1)


def _redis_database(offset: int) -> Iterator[str]:
    import redis

    # 8 numbers (7..14) per machine: parallel workers of one session never share one (worker index), and two
    # sessions at once (a helper beside CI) usually do not (the session's start time)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    session = int(os.environ.get("PYTEST_XDIST_TESTRUNUID", "0")[:8] or 0, 16) if is_xdist_worker() else os.getpid()
    url = REDIS_URL.rsplit("/", 1)[0] + "/" + str(7 + (session + 2 * worker + offset) % 8)
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable ({exc}); run scripts/services.sh")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a test module (the shared 2-core machine), restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def is_xdist_worker() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_configure(config: pytest.Config) -> None:
    """The session's controller names the folder of its background runs before its workers start (they inherit
    the environment), so every worker finds the runs another worker started."""
    from tests import background_suites

    if not is_xdist_worker():
        os.environ.pop(background_suites.RUNS_DIR_ENV, None)  # a fresh folder per session, never a parent's
        background_suites.runs_dir()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of the Flower wrappers last: a worker that reaches a wrapper waits for its background run, which
    by then has had the rest of the session to finish (xdist hands files out in this order)."""
    from tests import background_suites

    waiting = {item.path for item in items if item.name in background_suites.SUITES}
    items.sort(key=lambda item: item.path in waiting)  # stable: every other order is kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Flower files' runs in .venv-federated now when their wrapper tests are selected
    (`tests/background_suites.py` says why); of the workers that collect them, the first starts each run."""
    from importlib.util import find_spec

    from tests import background_suites

    if find_spec("flwr") is not None:  # in .venv-federated itself the Flower tests run directly
        return
    for item in session.items:
        if item.name in background_suites.SUITES:
            background_suites.start(item.name)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests import background_suites

    if not is_xdist_worker():  # the controller ends last: no worker still waits on a run
        background_suites.stop_all()
