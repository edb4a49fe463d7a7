"""Identify batching with real processes: concurrent identify requests share MPC jobs, each gets its own answer."""
from __future__ import annotations

import threading

import httpx
import pytest

from devtools.localstack import LocalStack
from tests.test_gateway_api import aligned_face, auth, payload
from tests.test_gateway_recovery import served_spec

pytestmark = pytest.mark.slow
# well apart under the test model (pairwise cosine <= 0.18 against its threshold of 0.37, noise sd ~0.04), so
# no stranger comes near an enrolled face: some LFW pairs (e.g. Aaron_Peirsol vs AJ_Cook, 0.34) do
FACES = ["Abdul_Rahman/Abdul_Rahman_0001.jpg", "Afton_Smith/Afton_Smith_0001.jpg",
         "Adolfo_Aguilar_Zinser/Adolfo_Aguilar_Zinser_0001.jpg", "Aby_Har-Even/Aby_Har-Even_0001.jpg",
         "Aaron_Guiel/Aaron_Guiel_0001.jpg"]


def jobs_run(stack: LocalStack) -> list[int]:
    """MPC jobs each party has run (a batch counts once)."""
    return [httpx.get(f"http://127.0.0.1:{port}/internal/state", headers=auth(token)).json()["jobs_run"]
            for port, token in zip(stack.party_ports, stack.tokens)]


def test_concurrent_identify_requests_share_mpc_jobs(tmp_path, shared):
    stack = LocalStack(tmp_path / "batch-stack")
    stack.cli("models", "ensure")
    for name in ("dealer", "party0", "party1"):
        stack.start_process(name)
    # a wide window so that the test does not depend on timing: all 8 requests land in it
    stack.start_process("gateway", {"PRIVFACE_IDENTIFY_BATCH_WAIT_MS": "300", "PRIVFACE_IDENTIFY_BATCH_MAX": "16"})
    try:
        stack.wait_ready()
        key = stack.api_key("enroll", "verify")
        spec = served_spec(stack, key)
        faces = {name: aligned_face(shared, name) for name in FACES}
        subjects = {}
        for name in FACES[:3]:  # three enrolled faces; the other two are strangers
            subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
            enrolled = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", timeout=60, headers=auth(key),
                                  json={"features": payload(spec, faces[name])})
            assert enrolled.status_code == 201, enrolled.text
            subjects[name] = subject
        probes = [FACES[i % len(FACES)] for i in range(8)]  # 3 enrolled faces seen twice or once, 2 strangers
        bodies = [{"features": payload(spec, faces[name])} for name in probes]
        before = jobs_run(stack)

        results: list[httpx.Response | None] = [None] * len(bodies)
        start = threading.Barrier(len(bodies))

        def call(i: int) -> None:
            start.wait()
            results[i] = httpx.post(stack.url + "/v1/identify", json=bodies[i], headers=auth(key), timeout=120)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        for name, response in zip(probes, results):
            assert response is not None and response.status_code == 200, response and response.text
            body = response.json()
            assert body["subject_id"] == subjects.get(name), (name, body)
            assert body["match"] is (name in subjects)
        after = jobs_run(stack)
        ran = [a - b for a, b in zip(after, before)]
        assert ran[0] == ran[1], ran
        assert 1 <= ran[0] < len(bodies), f"{ran[0]} MPC jobs for {len(bodies)} identify requests"
    finally:
        stack.stop()
