"""A party's match-job rate limit reaches the API client as a 429 problem with Retry-After (never a 500)."""
from __future__ import annotations

import httpx
import pytest

from devtools.localstack import LocalStack
from tests.test_gateway_api import aligned_face, assert_problem, auth, new_subject, payload
from tests.test_gateway_recovery import FACES, served_spec

pytestmark = pytest.mark.slow


def test_a_party_at_its_match_limit_gives_the_client_a_429(tmp_path, shared):
    stack = LocalStack(tmp_path, extra_env={"PRIVFACE_PARTY_MATCH_RATE_PER_S": "0.02",
                                            "PRIVFACE_PARTY_MATCH_BURST": "1"}).start()
    try:
        key = stack.api_key("enroll", "verify")
        spec = served_spec(stack, key)
        face = aligned_face(shared, FACES[0])
        new_subject(stack, key, spec, face)
        first = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)}, headers=auth(key),
                           timeout=60)
        assert first.status_code == 200, first.text
        second = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)}, headers=auth(key),
                            timeout=60)
        assert_problem(second, 429, "rate-limited")
        assert int(second.headers["Retry-After"]) >= 1
    finally:
        stack.stop()
