"""Prometheus metrics: a real stack (two gateway workers, Redis, two parties) is scraped after enroll, verify,
identify and budget refusals; the counters move with the right labels and the scrape holds no id or key."""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from devtools.localstack import LocalStack
from app.metrics import KNOWN_METHODS, REQUESTS, UNMATCHED, RequestMetrics
from tests.conftest import REDIS_URL
from tests.test_gateway_api import aligned_face, auth, new_subject, payload
from inference.transform import TransformSpec

IDENTIFY_BUDGET = 4


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in an exposition text."""
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for found, v in samples(text, name) if all(found.get(k) == w for k, w in labels.items()))


# --- unit: the label cardinality rule -------------------------------------------------------------------------

def test_labels_are_route_templates_never_raw_paths_or_methods():
    """A fuzzer's random paths, ids and methods must not create label sets: only templates, known methods."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    def item(item_id: str) -> dict:
        return {"id": item_id}

    app.add_middleware(RequestMetrics)
    client = TestClient(app)
    ids = [secrets.token_hex(8) for _ in range(50)]
    for item_id in ids:
        assert client.get(f"/items/{item_id}").status_code == 200
        assert client.get(f"/nowhere/{item_id}").status_code == 404
        client.request("BREW" + item_id[:4].upper(), f"/items/{item_id}")
    label_sets = {tuple(sorted(s.labels.items())) for family in REQUESTS.collect() for s in family.samples
                  if s.labels.get("route") in ("/items/{item_id}", UNMATCHED)}
    seen = {dict(labels)["route"] for labels in label_sets} | {dict(labels)["method"] for labels in label_sets}
    assert not any(item_id in label for item_id in ids for label in seen)
    assert {dict(labels)["method"] for labels in label_sets} <= KNOWN_METHODS | {"OTHER"}
    assert len(label_sets) <= 2 * 2 * 3  # route x method (GET, OTHER) x status (200, 404, 405): not 150


# --- integration: a real stack --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared):
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + "/" + str(7 + (os.getpid() % 8))
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(tmp_path_factory.mktemp("metrics-stack"), redis_url=url, gateway_workers=2,
                       extra_env={"PRIVFACE_RATE_IDENTIFY_PER_KEY": str(IDENTIFY_BUDGET)}).start()
    yield stack
    stack.stop()
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="module")
def keys(stack):
    return {"all": stack.api_key("enroll", "verify", "admin"), "verify": stack.api_key("verify")}


def scrape_gateway(stack: LocalStack, key: str) -> str:
    response = httpx.get(stack.url + "/metrics", headers=auth(key), timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def scrape_party(stack: LocalStack, rank: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{stack.party_ports[rank]}/metrics",
                         headers=auth(stack.tokens[rank]), timeout=30)
    assert response.status_code == 200, response.text
    return response.text


@pytest.mark.slow
def test_metrics_need_credentials(stack, keys):
    assert httpx.get(stack.url + "/metrics").status_code == 401
    refused = httpx.get(stack.url + "/metrics", headers=auth(keys["verify"]))
    assert refused.status_code == 403 and refused.headers["content-type"] == "application/problem+json"
    for rank in (0, 1):
        party = f"http://127.0.0.1:{stack.party_ports[rank]}/metrics"
        assert httpx.get(party).status_code == 401
        assert httpx.get(party, headers=auth(stack.tokens[1 - rank])).status_code == 401  # the other link's token


@pytest.mark.slow
def test_scrapes_after_enroll_verify_identify(stack, keys, shared):
    key = keys["all"]
    spec = TransformSpec.from_dict(httpx.get(stack.url + "/v1/transforms", headers=auth(key)).json()[0]["spec"])
    face = aligned_face(shared)
    before = scrape_gateway(stack, key)
    parties_before = [scrape_party(stack, rank) for rank in (0, 1)]
    subject = new_subject(stack, key, spec, face)
    verify = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, face)},
                        headers=auth(key), timeout=60)
    assert verify.status_code == 200, verify.text
    identify_key = stack.api_key("verify")
    statuses = [httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)},
                           headers=auth(identify_key), timeout=60).status_code for _ in range(IDENTIFY_BUDGET + 1)]
    assert statuses == [200] * IDENTIFY_BUDGET + [429]
    health = 20  # fresh connections, so both workers answer some: one scrape must count them all
    for _ in range(health):
        assert httpx.get(stack.url + "/healthz").status_code == 200
    after = scrape_gateway(stack, key)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/subjects/{subject_id}/enrollments"
    assert moved("privface_http_requests_total", method="POST", route=route, status="201") == 1
    assert moved("privface_http_request_duration_seconds_count", method="POST", route=route, status="201") == 1
    assert moved("privface_http_requests_total", method="POST", route="/v1/verify", status="200") == 1
    assert moved("privface_http_requests_total", method="POST", route="/v1/identify", status="200") == IDENTIFY_BUDGET
    assert moved("privface_http_requests_total", method="POST", route="/v1/identify", status="429") == 1
    assert moved("privface_http_requests_total", method="GET", route="/healthz", status="200") == health
    assert moved("privface_budget_refusals_total", route="identify", reason="rate-limited") == 1
    assert moved("privface_identify_batch_size_count") == IDENTIFY_BUDGET
    # after-refusal (the default): a gallery's first job from each worker is prechecked, the other 3+ jobs are not
    assert value(after, "privface_party_prechecks_total") >= 1 and moved("privface_party_prechecks_total") <= 2
    version = httpx.get(stack.url + "/v1/transforms", headers=auth(key)).json()[0]["model_version"]
    assert value(after, "privface_model_info", version=version) == 1
    assert value(after, "privface_party_up", party="0") == value(after, "privface_party_up", party="1") == 1
    assert value(after, "privface_party_mpc_connected", party="1") == 1

    for rank in (0, 1):
        party = scrape_party(stack, rank)

        def party_moved(name: str, **labels: str) -> float:
            return value(party, name, **labels) - value(parties_before[rank], name, **labels)

        assert party_moved("privface_party_match_jobs_total", kind="verify", status="200") == 1
        assert party_moved("privface_party_match_jobs_total", kind="identify", status="200") == IDENTIFY_BUDGET
        assert party_moved("privface_party_match_duration_seconds_count", kind="verify", status="200") == 1
        for name in ("privface_party_mpc_seconds_count", "privface_party_mpc_rounds_count",
                     "privface_party_mpc_bytes_count"):
            assert party_moved(name, kind="verify") == 1, name
        assert value(party, "privface_party_mpc_rounds_sum", kind="verify") > 0
        assert value(party, "privface_party_gallery_rows") >= 1
        assert value(party, "privface_party_mpc_connected") == 1
        for secret in (subject, key, identify_key, stack.tokens[rank], stack.secret):
            assert secret not in party
    for secret in (subject, key, identify_key, *stack.tokens, stack.secret, key.split("_")[1]):
        assert secret not in after
    assert "acme" not in after  # no tenant label


DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "privface-dashboard.json"


@pytest.mark.slow
def test_the_grafana_dashboard_queries_only_names_and_labels_a_real_scrape_has(stack, keys):
    """docs/grafana/privface-dashboard.json against real scrapes of the gateway and both parties. Runs after
    test_scrapes_after_enroll_verify_identify (module order): its traffic made every labelled series exist."""
    scraped: dict[str, set[str]] = {}  # sample name -> its label names
    for text in (scrape_gateway(stack, keys["all"]), scrape_party(stack, 0), scrape_party(stack, 1)):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scraped.setdefault(sample.name, set()).update(sample.labels)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(queries) >= 15
    for expr in queries:
        names = set(re.findall(r"\bprivface_\w+", expr))
        assert names and names <= set(scraped), (expr, names - set(scraped))
        labels = set(re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"', expr))
        labels |= {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        available = set().union(*(scraped[name] for name in names))
        assert labels <= available, (expr, labels - available)


def test_party_gallery_rows_are_labelled_by_model_only():
    """The parties' galleries are per tenant; the gauge sums them per model so no tenant id becomes a label."""
    from secure.party.metrics import rows_per_model

    counts = {"v1/acme/k1": {"rows": 3}, "v1/globex/k2": {"rows": 2}, "v2/acme/k1": {"rows": 1}, "plain": {"rows": 4}}
    assert rows_per_model(counts) == {"v1": 5, "v2": 1, "plain": 4}


@pytest.mark.slow
def test_party_down_shows_in_the_gateway_scrape(stack, keys):
    """Runs last in this module: it stops party 1. Its health gauge drops; party 0's stays up."""
    stack.kill("party1")
    text = scrape_gateway(stack, keys["all"])
    assert value(text, "privface_party_up", party="1") == 0
    assert value(text, "privface_party_mpc_connected", party="1") == 0
    assert value(text, "privface_party_up", party="0") == 1
    ready = httpx.get(stack.url + "/readyz", timeout=30)
    assert ready.status_code == 503 and "party 1" in ready.json()["checks"]["parties"]["error"]
