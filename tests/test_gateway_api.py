"""The REST API against the real stack: every bad input gets a clear 4xx problem and writes nothing."""
from __future__ import annotations

import base64
import secrets
import sqlite3
from datetime import datetime, timezone

import cv2
import httpx
import numpy as np
import pytest

from inference.transform import TransformSpec
from devtools.localstack import LocalStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared):
    stack = LocalStack(tmp_path_factory.mktemp("api-stack")).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def keys(stack):
    return {"all": stack.api_key("enroll", "verify", "admin"), "verify": stack.api_key("verify")}


@pytest.fixture(scope="module")
def spec(stack, keys) -> TransformSpec:
    served = httpx.get(stack.url + "/v1/transforms", headers=auth(keys["all"])).json()
    return TransformSpec.from_dict(served[0]["spec"])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def aligned_face(shared, name: str = "Aaron_Eckhart/Aaron_Eckhart_0001.jpg") -> np.ndarray:
    image = cv2.imread(str(shared / "datasets" / "lfw-aligned-112" / name))
    assert image is not None, name  # opencv >= 4.14 types imread as optional
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def payload(spec: TransformSpec, face: np.ndarray, **override) -> dict:
    features = spec.apply(face, np.random.default_rng(secrets.randbits(64)))
    body = {"transform_id": spec.transform_id, "params_hash": spec.params_hash, "shape": list(features.shape),
            "dtype": "float16", "data": base64.b64encode(features.astype("<f2").tobytes()).decode(),
            "epsilon": None if not spec.noisy else spec.epsilon_per_image, "nonce": secrets.token_hex(16),
            "created_at": datetime.now(timezone.utc).isoformat()}
    body.update(override)
    return body


def new_subject(stack: LocalStack, key: str, spec, face) -> str:
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
    enrolled = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": payload(spec, face)},
                          headers=auth(key), timeout=60)
    assert enrolled.status_code == 201, enrolled.text
    return subject


def raw_payload(spec: TransformSpec, array: np.ndarray, **override) -> dict:
    return payload(spec, np.zeros((112, 112, 3), np.uint8),
                   data=base64.b64encode(array.astype("<f2").tobytes()).decode(), **override)


def table_counts(stack: LocalStack) -> dict[str, int]:
    counts = {}
    with sqlite3.connect(stack.gateway_db.removeprefix("sqlite:///")) as conn:
        for table in ("subjects", "enrollments", "operations"):
            counts[table] = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    for rank in (0, 1):
        with sqlite3.connect(stack.party_dbs[rank].removeprefix("sqlite:///")) as conn:
            counts[f"party{rank}_shares"] = conn.execute("SELECT COUNT(*) FROM shares").fetchone()[0]
    return counts


@pytest.fixture(scope="module")
def subject(stack, keys, spec, shared) -> str:
    response = httpx.post(stack.url + "/v1/subjects", json={"external_id": "t1"}, headers=auth(keys["all"]))
    assert response.status_code == 201, response.text
    subject_id = response.json()["id"]
    enrolled = httpx.post(f"{stack.url}/v1/subjects/{subject_id}/enrollments",
                          json={"features": payload(spec, aligned_face(shared))}, headers=auth(keys["all"]), timeout=60)
    assert enrolled.status_code == 201, enrolled.text
    return subject_id


def assert_problem(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"].endswith("/" + slug), body
    assert body["status"] == status and body["title"] and "detail" in body


def test_enroll_verify_identify_round_trip(stack, keys, spec, shared, subject):
    same = aligned_face(shared, "Aaron_Eckhart/Aaron_Eckhart_0001.jpg")
    verify = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, same)},
                        headers=auth(keys["verify"]), timeout=60)
    assert verify.status_code == 200, verify.text
    assert set(verify.json()) == {"match", "model_version", "request_id"}
    assert verify.json()["match"] is True
    other = aligned_face(shared, "AJ_Cook/AJ_Cook_0001.jpg")
    identify = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, other)},
                          headers=auth(keys["verify"]), timeout=60)
    assert identify.status_code == 200, identify.text
    assert identify.json()["match"] is False and identify.json()["subject_id"] is None
    found = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, same)},
                       headers=auth(keys["verify"]), timeout=60)
    assert found.json()["match"] is True and found.json()["subject_id"] == subject


BAD_FEATURES = {
    "wrong-shape": lambda spec: ({"shape": [3, 14, 14]}, "invalid-shape"),
    "short-data": lambda spec: ({"data": base64.b64encode(b"\0" * 10).decode()}, "invalid-shape"),
    "not-base64": lambda spec: ({"data": "***"}, "invalid-encoding"),
    "unknown-transform": lambda spec: ({"transform_id": "dct8-nope"}, "unknown-transform"),
    "other-params": lambda spec: ({"params_hash": "0" * 16}, "unknown-transform"),
    "epsilon-lie": lambda spec: ({"epsilon": 0.001}, "epsilon-mismatch"),
    "stale": lambda spec: ({"created_at": "2020-01-01T00:00:00Z"}, "stale-payload"),
}


@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_bad_payload_is_refused_and_writes_nothing(stack, keys, spec, shared, subject, case):
    override, slug = BAD_FEATURES[case](spec)
    before = table_counts(stack)
    body = {"features": payload(spec, aligned_face(shared), **override)}
    response = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json=body, headers=auth(keys["all"]))
    assert_problem(response, 422, slug)
    assert table_counts(stack) == before


@pytest.mark.parametrize("value,slug", [(np.nan, "invalid-finite"), (np.inf, "invalid-finite"),
                                        (6e4, "invalid-range")])
def test_non_finite_or_out_of_range_features(stack, keys, spec, subject, value, slug):
    array = np.zeros(spec.shape, np.float32)
    array[0, 0, 0] = value
    before = table_counts(stack)
    response = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments",
                          json={"features": raw_payload(spec, array)}, headers=auth(keys["all"]))
    assert response.status_code == 422, response.text
    assert response.json()["type"].split("/")[-1].startswith("invalid-")
    assert table_counts(stack) == before


@pytest.mark.parametrize("kind", ["all-zero features", "grey frame"])
def test_features_without_a_face_are_refused_and_change_nothing(stack, keys, spec, subject, kind):
    """Issue 10: non-face inputs matched someone. Enroll, verify and identify refuse them with a 422 before anything
    is embedded or stored, and before the nonce is spent: the same body is refused the same way again (not 409)."""
    body = raw_payload(spec, np.zeros(spec.shape, np.float32)) if kind == "all-zero features" else \
        payload(spec, np.full((112, 112, 3), 128, np.uint8))
    before = table_counts(stack)
    for path, extra in ((f"/v1/subjects/{subject}/enrollments", {}), ("/v1/verify", {"subject_id": subject}),
                        ("/v1/identify", {})):
        for _ in range(2):
            response = httpx.post(stack.url + path, json={"features": body, **extra}, headers=auth(keys["all"]),
                                  timeout=60)
            assert_problem(response, 422, "no-face-in-features")
            assert "no face" in response.json()["detail"]
    assert table_counts(stack) == before


def test_openapi_documents_the_no_face_422(stack):
    paths = httpx.get(stack.url + "/openapi.json").json()["paths"]
    for path in ("/v1/subjects/{subject_id}/enrollments", "/v1/verify", "/v1/identify"):
        examples = paths[path]["post"]["responses"]["422"]["content"]["application/problem+json"]["examples"]
        assert examples["no-face-in-features"]["value"]["type"].endswith("/no-face-in-features"), path


def test_oversized_body(stack, keys, subject):
    before = table_counts(stack)
    response = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", headers=auth(keys["all"]),
                          content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                          )
    assert_problem(response, 413, "payload-too-large")
    assert table_counts(stack) == before


def test_missing_invalid_key_and_wrong_scope(stack, keys, spec, shared, subject):
    body = {"features": payload(spec, aligned_face(shared))}
    url = f"{stack.url}/v1/subjects/{subject}/enrollments"
    before = table_counts(stack)
    assert_problem(httpx.post(url, json=body), 401, "unauthorized")
    assert_problem(httpx.post(url, json=body, headers=auth("pf_nothing_here")), 401, "unauthorized")
    assert_problem(httpx.post(url, json=body, headers=auth(keys["all"][:-2] + "xx")), 401, "unauthorized")
    assert_problem(httpx.post(url, json=body, headers=auth(keys["verify"])), 403, "forbidden")
    assert table_counts(stack) == before


def test_unknown_subject(stack, keys, spec, shared):
    before = table_counts(stack)
    body = {"features": payload(spec, aligned_face(shared))}
    assert_problem(httpx.post(f"{stack.url}/v1/subjects/sub_nope/enrollments", json=body, headers=auth(keys["all"])),
                   404, "subject-not-found")
    assert_problem(httpx.post(f"{stack.url}/v1/verify", json={"subject_id": "sub_nope", **body},
                              headers=auth(keys["all"])), 404, "subject-not-found")
    assert_problem(httpx.get(f"{stack.url}/v1/subjects/sub_nope", headers=auth(keys["all"])), 404, "subject-not-found")
    assert table_counts(stack) == before


def test_other_tenant_cannot_see_subject(stack, spec, shared, subject):
    other = stack.api_key("enroll", "verify", tenant="globex")
    assert_problem(httpx.get(f"{stack.url}/v1/subjects/{subject}", headers=auth(other)), 404, "subject-not-found")
    identify = httpx.post(stack.url + "/v1/identify", headers=auth(other), timeout=60,
                          json={"features": payload(spec, aligned_face(shared))})
    assert identify.status_code == 200 and identify.json()["match"] is False


def test_replayed_nonce(stack, keys, spec, shared, subject):
    body = {"subject_id": subject, "features": payload(spec, aligned_face(shared))}
    assert httpx.post(stack.url + "/v1/verify", json=body, headers=auth(keys["all"]), timeout=60).status_code == 200
    assert_problem(httpx.post(stack.url + "/v1/verify", json=body, headers=auth(keys["all"]), timeout=60),
                   409, "replayed-nonce")


def test_malformed_json_is_a_problem(stack, keys):
    response = httpx.post(stack.url + "/v1/verify", content=b"{not json", headers={
        **auth(keys["all"]), "content-type": "application/json"})
    assert_problem(response, 422, "validation-error")


def test_openapi_has_examples_for_every_operation(stack):
    spec = httpx.get(stack.url + "/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary") or operation.get("description"), (method, path)
            body = operation.get("requestBody")
            if body:
                schema = body["content"]["application/json"]["schema"]
                ref = schema["$ref"].split("/")[-1]
                assert spec["components"]["schemas"][ref].get("examples"), (method, path)


def test_readyz_reports_parties_model_and_provider(stack):
    ready = httpx.get(stack.url + "/readyz").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["model"]["providers"] == ["CPUExecutionProvider"]
    assert ready["checks"]["parties"]["ok"] is True
