"""PrivfaceClient against a real HTTP server (uvicorn on a free port): calls, error mapping, retries."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest

from client.errors import (AuthenticationError, ConflictError, InvalidRequestError, MultipleFacesError, NoFaceError,
                           NotFoundError, PermissionDeniedError, PrivacyBudgetError, PrivfaceError,
                           ServiceUnavailableError)
from client.features import decode_features, load_photo
from client.sdk import PrivfaceClient
from inference.transform import default_spec
from tests.client_gateway import gateway  # noqa: F401  (module fixture)
from tests.client_gateway import API_KEY, GatewayScript, ScriptedGateway
from tests.conftest import free_port
from tests.test_client_detect import FACES

PHOTO = FACES / "Bill_Maher_0001.jpg"


@pytest.fixture
def script(gateway: ScriptedGateway) -> GatewayScript:
    gateway.script.reset()
    return gateway.script


@pytest.fixture
def client(gateway: ScriptedGateway) -> Iterator[PrivfaceClient]:
    with PrivfaceClient(gateway.url, API_KEY, timeout=5, retries=3, backoff_s=0.01) as sdk:
        yield sdk


def sent_json(script: GatewayScript, index: int = -1) -> dict:
    return json.loads(script.requests[index][2])


def test_subject_calls(client: PrivfaceClient, script: GatewayScript) -> None:
    assert client.create_subject("customer-1")["id"] == "sub_1"
    assert sent_json(script) == {"external_id": "customer-1"}
    assert client.get_subject("sub_1")["enrollments"] == []
    assert client.delete_subject("sub_1") is None
    assert [r[:2] for r in script.requests] == [("POST", "/v1/subjects"), ("GET", "/v1/subjects/sub_1"),
                                                ("DELETE", "/v1/subjects/sub_1")]


def test_transform_is_fetched_once_from_the_gateway(client: PrivfaceClient, script: GatewayScript) -> None:
    assert client.transform == script.spec
    assert client.transform == script.spec
    assert [r[1] for r in script.requests] == ["/v1/transforms"]


def test_a_transform_that_rebuilds_differently_is_refused(client: PrivfaceClient, script: GatewayScript) -> None:
    script.advertised_hash = "0" * 16
    with pytest.raises(PrivfaceError, match="versions differ"):
        client.transform


def test_enroll_verify_identify_send_features_only(client: PrivfaceClient, script: GatewayScript) -> None:
    enrollment = client.enroll("sub_1", PHOTO)
    assert enrollment["subject_id"] == "sub_1" and enrollment["epsilon"] == script.spec.epsilon_per_image
    body = sent_json(script)
    assert set(body) == {"features"} and decode_features(body["features"]).shape == script.spec.shape
    assert client.verify("sub_1", PHOTO) is False
    script.match_subject = "sub_1"
    assert client.verify("sub_1", PHOTO) is True
    assert client.identify(PHOTO) == "sub_1"
    script.match_subject = None
    assert client.identify(PHOTO) is None
    paths = [r[1] for r in script.requests]
    assert paths == ["/v1/transforms", "/v1/subjects/sub_1/enrollments", "/v1/verify", "/v1/verify",
                     "/v1/identify", "/v1/identify"]
    raw = PHOTO.read_bytes()
    assert all(raw[:64] not in r[2] for r in script.requests), "photo bytes never go over the wire"


def test_precomputed_features(client: PrivfaceClient, script: GatewayScript) -> None:
    payload = client.features(PHOTO)
    script.match_subject = "sub_9"
    assert client.verify_features("sub_9", payload) is True
    assert sent_json(script) == {"subject_id": "sub_9", "features": payload}
    assert client.enroll_features("sub_9", payload)["subject_id"] == "sub_9"
    assert client.identify_features(payload) == "sub_9"


def test_face_errors_are_raised_before_any_request(gateway: ScriptedGateway, script: GatewayScript) -> None:
    with PrivfaceClient(gateway.url, API_KEY, transform=default_spec()) as sdk:
        with pytest.raises(NoFaceError):
            sdk.verify("sub_1", np.full((200, 200, 3), 128, np.uint8))
        two = np.concatenate([load_photo(FACES / "James_Caan_0001.jpg"), load_photo(FACES / "Mary_Jo_Myers_0001.jpg")],
                             axis=1)
        with pytest.raises(MultipleFacesError) as caught:
            sdk.enroll("sub_1", two)
        assert caught.value.count == 2 and caught.value.status is None
        sdk.enroll("sub_1", two, face_policy="largest")
    # the face errors sent nothing; the one enrollment first asks the tenant's mode (sealed mode, docs/sealed.md)
    assert [r[1] for r in script.requests] == ["/v1/transforms", "/v1/subjects/sub_1/enrollments"]


@pytest.mark.parametrize(("status", "error"), [
    (400, InvalidRequestError), (403, PermissionDeniedError), (404, NotFoundError), (409, ConflictError),
    (413, InvalidRequestError), (415, InvalidRequestError), (422, InvalidRequestError), (500, PrivfaceError)])
def test_problem_json_maps_to_typed_errors(client: PrivfaceClient, script: GatewayScript, status: int,
                                           error: type[PrivfaceError]) -> None:
    script.status_override = status
    with pytest.raises(error) as caught:
        client.create_subject()
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.problem["type"] == "https://privface.dev/problems/scripted"
    assert str(caught.value) == f"Scripted error: status {status}"
    assert len(script.requests) == 1, "only 503 is retried"


def test_wrong_key_is_an_authentication_error(gateway: ScriptedGateway, script: GatewayScript) -> None:
    with PrivfaceClient(gateway.url, "wrong") as sdk, pytest.raises(AuthenticationError) as caught:
        sdk.get_subject("sub_1")
    assert caught.value.status == 401 and caught.value.problem["detail"] == "bad key"


def test_unknown_subject(client: PrivfaceClient, script: GatewayScript) -> None:
    with pytest.raises(NotFoundError, match="Unknown subject: No subject with id 'nobody'"):
        client.get_subject("nobody")


def test_non_json_error_body(client: PrivfaceClient, script: GatewayScript) -> None:
    script.plain_text_error = True
    with pytest.raises(PrivfaceError) as caught:
        client.get_subject("sub_1")
    assert caught.value.status == 502 and "upstream exploded" in str(caught.value)


def test_503_is_retried_with_a_fresh_nonce(client: PrivfaceClient, script: GatewayScript) -> None:
    payload = client.features(PHOTO)
    script.fail_503 = 2
    assert client.enroll_features("sub_1", payload)["subject_id"] == "sub_1"
    bodies = [sent_json(script, i)["features"] for i in range(-3, 0)]
    assert bodies[0] == payload
    assert len({b["nonce"] for b in bodies}) == 3, "a retry must not reuse a nonce the gateway has seen"
    assert {b["data"] for b in bodies} == {payload["data"]}, "a retry resends the same features (no new noise)"


def test_503_after_all_retries(client: PrivfaceClient, script: GatewayScript) -> None:
    script.fail_503 = 10
    with pytest.raises(ServiceUnavailableError) as caught:
        client.create_subject()
    assert caught.value.status == 503 and caught.value.problem["detail"] == "party 1 down"
    assert len(script.requests) == 4, "one try plus three retries"


def test_retry_after_is_honoured(gateway: ScriptedGateway, script: GatewayScript) -> None:
    script.fail_503, script.retry_after = 1, "1"
    with PrivfaceClient(gateway.url, API_KEY, retries=1, backoff_s=0.0) as sdk:
        started = time.monotonic()
        sdk.get_subject("sub_1")
    assert time.monotonic() - started >= 0.95
    assert len(script.requests) == 2


def test_no_retries_when_asked(gateway: ScriptedGateway, script: GatewayScript) -> None:
    script.fail_503 = 1
    with PrivfaceClient(gateway.url, API_KEY, retries=0) as sdk, pytest.raises(ServiceUnavailableError):
        sdk.get_subject("sub_1")
    assert len(script.requests) == 1


def test_connection_refused_is_retried_then_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with PrivfaceClient(url, API_KEY, retries=2, backoff_s=0.1) as sdk, \
            pytest.raises(ServiceUnavailableError, match="cannot connect") as caught:
        sdk.create_subject()
    assert caught.value.status is None
    assert time.monotonic() - started >= 0.3 - 0.02, "backoff 0.1 s then 0.2 s between the three tries"


def test_a_read_timeout_is_not_retried(gateway: ScriptedGateway, script: GatewayScript) -> None:
    """The request may have taken effect (e.g. an enrollment), so it is not sent again."""
    script.delay_s = 0.5
    with PrivfaceClient(gateway.url, API_KEY, timeout=0.1, retries=3) as sdk:
        with pytest.raises(PrivfaceError, match="ReadTimeout") as caught:
            sdk.create_subject()
    assert not isinstance(caught.value, ServiceUnavailableError)
    assert len(script.requests) == 1


def test_a_transform_change_on_the_gateway_is_followed(client: PrivfaceClient, script: GatewayScript) -> None:
    old = client.transform
    script.spec = old.with_epsilon(old.epsilon_per_coefficient * 2)  # the gateway activates a model with another transform
    script.match_subject = "sub_1"
    assert client.verify("sub_1", PHOTO) is True
    assert client.transform == script.spec
    assert [r[1] for r in script.requests] == ["/v1/transforms", "/v1/verify", "/v1/transforms", "/v1/verify"]
    assert sent_json(script)["features"]["params_hash"] == script.spec.params_hash


def test_a_transform_given_by_the_app_is_kept(gateway: ScriptedGateway, script: GatewayScript) -> None:
    other = script.spec.with_epsilon(script.spec.epsilon_per_coefficient * 2)
    with PrivfaceClient(gateway.url, API_KEY, transform=other) as sdk:
        with pytest.raises(InvalidRequestError) as caught:
            sdk.identify(PHOTO)
    assert caught.value.problem["type"].endswith("/unknown-transform")
    assert [r[1] for r in script.requests] == ["/v1/transforms", "/v1/identify"]  # the mode only; no refetch


def test_a_transform_above_the_apps_budget_is_refused(gateway: ScriptedGateway, script: GatewayScript) -> None:
    budget = script.spec.epsilon_per_image
    with PrivfaceClient(gateway.url, API_KEY, max_epsilon=budget) as sdk:
        assert sdk.features(PHOTO)["epsilon"] == budget
    script.spec = script.spec.with_epsilon(None)  # a gateway asking for clean features
    with PrivfaceClient(gateway.url, API_KEY, max_epsilon=budget) as sdk:
        with pytest.raises(PrivacyBudgetError, match="ε=inf"):
            sdk.enroll("sub_1", PHOTO)
    assert "/v1/subjects/sub_1/enrollments" not in [r[1] for r in script.requests]
