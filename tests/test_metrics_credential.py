"""The read-only scrape credential (issue 13): a gateway key with only the `metrics` scope, and a party's
PRIVFACE_PARTY_METRICS_TOKEN, may GET /metrics and nothing else; the old credentials (an admin key, the link
token) still scrape. In process: the real gateway app on SQLite (no party needed) and the real party app with
the TEST-ONLY plaintext engine of tests/party_harness.py.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from app.auth import create_api_key, ensure_tenant
from app.db import session_scope
from app.main import create_app
from app.settings import GatewaySettings
from tests.test_gateway_api import assert_problem, auth

HARNESS = Path(__file__).with_name("party_harness.py")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("metrics-credential")
    settings = GatewaySettings(env="test", database_url=f"sqlite:///{workdir / 'gateway.db'}",
                               model_dir=workdir / "models", bundled_model_dir="", redis_url=None,
                               party_urls="http://127.0.0.1:9,http://127.0.0.1:9")  # parties down: still scrapes
    app = create_app(settings)
    with TestClient(app) as client:
        client.ctx = app.state.ctx
        yield client


def new_key(gateway, *scopes: str) -> str:
    with session_scope(gateway.ctx.sessions) as session:
        ensure_tenant(session, "acme")
        return create_api_key(session, "acme", list(scopes), gateway.ctx.settings.secret_key)


def operations(app) -> list[tuple[str, str]]:
    """(METHOD, path template) of every route the app documents (its OpenAPI schema: the included routers too)."""
    return [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item
            if method in ("get", "post", "put", "patch", "delete")]


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_a_metrics_key_scrapes_the_gateway_and_is_refused_on_every_other_route(gateway):
    """Every route that answers 401 without a key answers 403 problem+json to the metrics key (nothing runs:
    the scope check comes before the body is read), except GET /metrics, which it scrapes."""
    scraper = new_key(gateway, "metrics")
    scrape = gateway.get("/metrics", headers=auth(scraper))
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    assert "privface_http_requests_total" in scrape.text
    checked, not_refused = [], []
    for method, route in operations(gateway.app):
        path = concrete(route)
        if route == "/metrics" or gateway.request(method, path).status_code != 401:
            not_refused.append(f"{method} {route}")
            continue
        assert_problem(gateway.request(method, path, headers=auth(scraper)), 403, "forbidden")
        checked.append(f"{method} {route}")
    assert sorted(not_refused) == ["GET /healthz", "GET /metrics", "GET /readyz"], not_refused
    assert len(checked) >= 20 and "GET /v1/transforms" in checked and "POST /v1/admin/keys" in checked, checked


def test_the_old_way_still_scrapes_and_other_keys_are_still_refused(gateway):
    assert gateway.get("/metrics").status_code == 401
    assert gateway.get("/metrics", headers=auth(new_key(gateway, "admin"))).status_code == 200
    assert_problem(gateway.get("/metrics", headers=auth(new_key(gateway, "enroll", "verify"))), 403, "forbidden")
    assert gateway.get("/v1/transforms", headers=auth(new_key(gateway, "verify"))).status_code == 200


def test_an_admin_creates_a_metrics_key_that_stands_alone(gateway):
    admin = new_key(gateway, "admin")
    created = gateway.post("/v1/admin/keys", json={"scopes": ["metrics"]}, headers=auth(admin))
    assert created.status_code == 201 and created.json()["key"]["scopes"] == ["metrics"], created.text
    assert gateway.get("/metrics", headers=auth(created.json()["api_key"])).status_code == 200
    mixed = gateway.post("/v1/admin/keys", json={"scopes": ["metrics", "admin"]}, headers=auth(admin))
    assert_problem(mixed, 422, "validation-error")
    assert "metrics scope stands alone" in mixed.text
    with pytest.raises(ValueError, match="stands alone"):
        new_key(gateway, "metrics", "verify")


def party_client(tmp_path, **settings) -> TestClient:
    spec = importlib.util.spec_from_file_location("party_harness", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    from secure.party.db import migrate_party_db
    from secure.party.server import create_party_app
    from secure.party.settings import PartySettings

    url = f"sqlite:///{tmp_path / 'party0.db'}"
    migrate_party_db(url)
    party = PartySettings(rank=0, database_url=url, internal_token="link-token-0", **settings)
    return TestClient(create_party_app(party, harness.LocalPlaintextEngine(0, tmp_path / "rendezvous")))


def test_the_party_metrics_token_scrapes_and_is_refused_on_every_internal_route(tmp_path):
    with party_client(tmp_path, metrics_token="scrape-only-0") as party:
        assert party.get("/metrics", headers=auth("scrape-only-0")).status_code == 200
        assert party.get("/metrics", headers=auth("link-token-0")).status_code == 200  # the old way
        assert party.get("/metrics").status_code == 401
        internal = [(method, concrete(path)) for method, path in operations(party.app) if path.startswith("/internal")]
        assert len(internal) >= 8, internal
        for method, path in internal:
            assert_problem(party.request(method, path, headers=auth("scrape-only-0")), 403, "metrics-only")
        assert party.get("/internal/state", headers=auth("link-token-0")).status_code == 200
    with party_client(tmp_path) as party:  # none configured: only the link token scrapes
        assert party.get("/metrics", headers=auth("scrape-only-0")).status_code == 401
    from secure.party.settings import PartySettings

    with pytest.raises(ValueError, match="must differ"):
        PartySettings(rank=0, internal_token="same", metrics_token="same")
