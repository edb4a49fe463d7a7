"""Crash recovery with real processes: SIGKILL a party during identify, SIGKILL the gateway mid-enrollment."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from devtools.localstack import LocalStack
from tests.test_gateway_api import aligned_face, auth, payload
from inference.transform import TransformSpec

pytestmark = pytest.mark.slow
FACES = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "AJ_Cook/AJ_Cook_0001.jpg", "Aaron_Guiel/Aaron_Guiel_0001.jpg",
         "Aaron_Patterson/Aaron_Patterson_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0001.jpg"]


def served_spec(stack: LocalStack, key: str) -> TransformSpec:
    return TransformSpec.from_dict(httpx.get(stack.url + "/v1/transforms", headers=auth(key)).json()[0]["spec"])


def enroll(stack: LocalStack, key: str, spec: TransformSpec, face, timeout: float = 60) -> httpx.Response:
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
    return httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": payload(spec, face)},
                      headers=auth(key), timeout=timeout)


def share_seqs(stack: LocalStack, rank: int) -> list[int]:
    with sqlite3.connect(stack.party_dbs[rank].removeprefix("sqlite:///")) as conn:
        return [row[0] for row in conn.execute("SELECT template_seq FROM shares WHERE del_seq IS NULL ORDER BY 1")]


def enrollment_seqs(stack: LocalStack) -> list[int]:
    with sqlite3.connect(stack.gateway_db.removeprefix("sqlite:///")) as conn:
        return [row[0] for row in conn.execute("SELECT template_seq FROM enrollments ORDER BY 1")]


def test_party_killed_during_identify_gives_503_then_recovers(tmp_path, shared):
    stack = LocalStack(tmp_path, party_timeout_s=10.0, mpc_op_timeout_s=5.0).start()
    try:
        key = stack.api_key("enroll", "verify")
        spec = served_spec(stack, key)
        faces = [aligned_face(shared, name) for name in FACES]
        for face in faces * 4:  # a gallery of 20 templates
            assert enroll(stack, key, spec, face).status_code == 201
        before = enrollment_seqs(stack)
        outcomes: list[tuple[int, float, dict]] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, faces[0])},
                                          headers=auth(key), timeout=60)
                    outcomes.append((response.status_code, time.monotonic() - started, response.json()))
                except httpx.HTTPError as exc:
                    outcomes.append((0, time.monotonic() - started, {"error": str(exc)}))
                if outcomes[-1][0] != 200:
                    return

        thread = threading.Thread(target=hammer)
        thread.start()
        while sum(1 for o in outcomes if o[0] == 200) < 2:
            time.sleep(0.05)
        stack.kill("party1")
        thread.join(timeout=60)
        stop.set()
        status, elapsed, body = outcomes[-1]
        assert status == 503, outcomes[-1]
        assert body["type"].endswith("/service-unavailable")
        assert elapsed <= stack.party_timeout_s + 5.0, elapsed
        stack.start_process("party1")
        stack.wait_ready(timeout=120)
        response = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, faces[0])},
                              headers=auth(key), timeout=60)
        assert response.status_code == 200 and response.json()["match"] is True, response.text
        assert enrollment_seqs(stack) == before == share_seqs(stack, 0) == share_seqs(stack, 1)
    finally:
        stack.stop()


@pytest.mark.parametrize("point", ["enroll-after-prepare", "enroll-after-decision", "enroll-between-acks"])
def test_gateway_killed_mid_enrollment_loses_and_duplicates_nothing(tmp_path, shared, point):
    stack = LocalStack(tmp_path).start()
    try:
        key = stack.api_key("enroll", "verify")
        spec = served_spec(stack, key)
        face = aligned_face(shared, FACES[0])
        assert enroll(stack, key, spec, face).status_code == 201
        stack.kill("gateway", 15)
        stack.start_process("gateway", {"PRIVFACE_FAILPOINTS": point, "PRIVFACE_FAILPOINT_DIR": str(tmp_path)})
        stack.wait_ready()
        result: list = []
        thread = threading.Thread(target=lambda: result.append(_enroll_quietly(stack, key, spec, face)))
        thread.start()
        marker = Path(tmp_path, point)
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the gateway never reached the failpoint"
        stack.kill("gateway")  # SIGKILL while frozen at the failpoint
        thread.join(timeout=30)
        assert result and result[0] is None  # the client saw the connection drop, not a success
        stack.start_process("gateway")
        stack.wait_ready()
        deadline = time.monotonic() + 60  # the reconcile loop finishes the interrupted operation
        while time.monotonic() < deadline:
            if enrollment_seqs(stack) == share_seqs(stack, 0) == share_seqs(stack, 1) and not open_ops(stack):
                break
            time.sleep(0.5)
        enrolled = enrollment_seqs(stack)
        assert enrolled == share_seqs(stack, 0) == share_seqs(stack, 1)
        expected = 1 if point == "enroll-after-prepare" else 2  # undecided → aborted; decided → committed
        assert len(enrolled) == expected
        assert open_ops(stack) == 0
        identify = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)},
                              headers=auth(key), timeout=60)
        assert identify.status_code == 200 and identify.json()["match"] is True
    finally:
        stack.stop()


def open_ops(stack: LocalStack) -> int:
    with sqlite3.connect(stack.gateway_db.removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT COUNT(*) FROM operations WHERE state = 'preparing' "
                            "OR acked_0 = 0 OR acked_1 = 0").fetchone()[0]


def _enroll_quietly(stack: LocalStack, key: str, spec: TransformSpec, face) -> int | None:
    try:
        return enroll(stack, key, spec, face, timeout=120).status_code
    except httpx.HTTPError:
        return None
