"""Structured logs and the request id (issue 13): one request's id in the gateway's and both parties' logs (their
MPC job line included), JSON or text lines by PRIVFACE_LOG_FORMAT, and no traceback for an admin's bad input."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time

import httpx
import pytest

from devtools.localstack import LocalStack
from common import logs
from tests.test_gateway_api import aligned_face, auth, new_subject, payload
from tests.test_gateway_recovery import FACES, served_spec


def capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    """A logger writing through ``fmt``'s formatter and the request-id filter into a buffer."""
    from uvicorn.logging import DefaultFormatter

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    text_format = logs.logging_config("text")["formatters"]["default"]["fmt"]
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else DefaultFormatter(text_format, use_colors=False))
    handler.addFilter(logs.RequestIdFilter())
    logger = logging.getLogger(f"privface.test.{fmt}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, buffer


def in_request(rid: str | None, fn) -> str:  # noqa: ANN001
    """Run ``fn`` the way a request does, inside RequestIdMiddleware with ``rid`` as the client's header; the id
    the middleware answered."""
    async def app(scope, receive, send):  # noqa: ANN001
        fn()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"x-request-id", rid.encode())] if rid is not None else []
    asyncio.run(logs.RequestIdMiddleware(app)({"type": "http", "headers": headers}, None, send))
    return dict(sent[0]["headers"])[b"x-request-id"].decode()


def test_request_ids_are_accepted_only_as_short_tokens():
    assert logs.accepted_request_id("req-42.a:b_C") == "req-42.a:b_C"
    for bad in ("", "has space", "line\nbreak", "x" * 129, '{"json": 1}', None):
        assert logs.accepted_request_id(bad) is None


def test_json_lines_carry_the_request_id_and_keep_a_traceback_inside_the_line():
    logger, buffer = capture("json")
    answered = in_request("client-id-1", lambda: logger.info("handled %s", "it"))
    assert answered == "client-id-1"
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    first, second = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert first["message"] == "handled it" and first["request_id"] == "client-id-1" and first["level"] == "INFO"
    assert "request_id" not in second and "ValueError: boom" in second["exc"]


def test_text_lines_carry_the_request_id_and_a_bad_header_gets_a_fresh_id():
    logger, buffer = capture("text")
    answered = in_request("bad id\n", lambda: logger.warning("handled"))
    assert re.fullmatch(r"[0-9a-f]{32}", answered)
    assert f"[{answered}] privface.test.text: handled" in buffer.getvalue()
    with pytest.raises(SystemExit, match="PRIVFACE_LOG_FORMAT"):
        logs.log_format("yaml")


def lines_with(text: str, rid: str) -> list[dict]:
    """The JSON lines of a log that carry ``rid``."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("request_id") == rid:
                found.append(entry)
    return found


@pytest.mark.slow
def test_one_request_id_follows_a_verify_through_gateway_parties_and_mpc_job(tmp_path, shared):
    stack = LocalStack(tmp_path / "logs-stack", extra_env={"PRIVFACE_LOG_FORMAT": "json"}).start()
    try:
        key = stack.api_key("enroll", "verify", "admin")
        spec = served_spec(stack, key)
        face = aligned_face(shared, FACES[0])
        subject = new_subject(stack, key, spec, face)
        rid = "it-" + str(time.time_ns())
        response = httpx.post(stack.url + "/v1/verify", timeout=120, json={"subject_id": subject,
                              "features": payload(spec, face)}, headers={**auth(key), "X-Request-ID": rid})
        assert response.status_code == 200 and response.json()["match"] is True, response.text
        assert response.headers["x-request-id"] == rid
        generated = httpx.get(stack.url + "/v1/transforms", headers=auth(key)).headers["x-request-id"]
        refused = httpx.post(stack.url + "/v1/admin/jobs", headers=auth(key),
                             json={"kind": "register-model", "params": {"path": "../../etc"}})
        assert refused.status_code == 202, refused.text
        job = refused.json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{stack.url}/v1/admin/jobs/{job}", headers=auth(key)).json()["status"] != "failed":
            assert time.monotonic() < deadline, "the job with a bad path did not fail"
            time.sleep(0.2)
        time.sleep(1.0)  # the parties' access lines are written after their answers

        gateway = stack.log("gateway")
        assert [e for e in lines_with(gateway, rid) if "/v1/verify" in e["message"]], "no gateway line for it"
        assert lines_with(gateway, generated), "a generated id is logged too"
        for rank in (0, 1):
            party = lines_with(stack.log(f"party{rank}"), rid)
            assert any("/internal/match " in e["message"] for e in party), f"party {rank}: {party}"
            assert any(e["logger"] == "privface.mpc" and e["message"].startswith("mpc job ") for e in party), \
                f"party {rank} has no MPC job line for the request: {party}"
        for name in ("gateway", "party0", "party1", "dealer"):
            text = stack.log(name)
            assert text.strip(), name
            python_lines = [line for line in text.splitlines() if not line.startswith(("[W", "[I", "[E"))]
            assert all(line.startswith("{") for line in python_lines), (name, python_lines[:5])
        refusal = [json.loads(line) for line in gateway.splitlines() if job in line]
        assert refusal and refusal[0]["level"] == "WARNING" and "exc" not in refusal[0], refusal
        assert "Traceback" not in gateway
    finally:
        stack.stop()
