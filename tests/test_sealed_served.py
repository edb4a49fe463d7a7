"""Sealed mode served (issue 12) on the real stack (gateway, two parties, dealer; real processes, real LFW faces):
a tenant switched to mode `sealed` enrolls and verifies through the SDK, which seals its features automatically;
the sealed decision equals the plaintext twin's; the gateway's database and log hold no feature or share in the
clear; a payload of the other mode and bad envelopes are refused with problem+json and change nothing.

One stack for the module (the MPC start-up dominates). Identities: LFW people outside View 2 (training side).
"""
from __future__ import annotations

import base64
import copy
import json
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import client.sealed as client_sealed
from client.errors import InvalidFeaturesError
from client.features import FeaturePayload, decode_features, encode_features, utc_now
from client.sdk import PrivfaceClient
from client.sealed import MAX_ABS, encode_fixed, seal_share, split_shares, unix_seconds
from common.paths import PROJECT_ROOT
from devtools.localstack import NO_ABUSE_LIMITS, LocalStack
from devtools.memscan import can_read_memory, find_in_memory, process_tree
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.sealed_student import flip_planes
from inference.transform import OsNoise, TransformSpec
from secure import sealed_box
from app.services.templates import gallery_name
from app.settings import GatewaySettings
from secure.party.sealed import load_sealed_model
from tests.test_gateway_api import auth
from tests.test_sealed_mpc import run_folded

pytestmark = pytest.mark.slow
MODEL_DIR = PROJECT_ROOT / "inference" / "bundled"
# the gateway's default (LocalStack passes no PRIVFACE_SEALED_MODEL_VERSION): the test follows the served model
VERSION = str(GatewaySettings.model_fields["sealed_model_version"].default)
# a genuine pair of people outside View 2 that the served student accepts with a margin: sealed-v6's twin scores
# Dorthy_Moxley_0001/0002 0.74-0.80 over 40 noise draws (threshold 0.374; sealed-v7, its weights: 0.461); sealed-v5's 0.74-0.81 (threshold 0.368);
# sealed-v4's 0.72-0.78 (threshold 0.360);
# sealed-v3's 0.73-0.79 (threshold 0.366);
# sealed-v2's 0.72-0.79 (threshold 0.461); sealed-v1's 0.59-0.68 (threshold 0.741)
GENUINE = "Dorthy_Moxley"
TIE = 5e-3  # twin scores this close to the threshold are fixed-point ties (the MPC's score error is ~1.6e-3)


@dataclass
class Served:
    """The running stack and an API key of tenant acme with every scope."""

    local: LocalStack
    admin: str

    @property
    def url(self) -> str:
        return self.local.url

    def calls(self) -> list[list[str]]:
        """Each party's traffic record so far: one 'METHOD PATH BYTES' per call (secure/party/traffic.py)."""
        return [(self.local.workdir / f"party{rank}.traffic").read_text().splitlines() for rank in (0, 1)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    local = LocalStack(tmp_path_factory.mktemp("sealed"), party_timeout_s=60.0, extra_env=dict(NO_ABUSE_LIMITS))
    try:
        local.cli("models", "ensure")
        for name in ("dealer", "party0", "party1", "gateway"):
            traffic = {"PRIVFACE_PARTY_TRAFFIC_LOG": str(local.workdir / f"{name}.traffic")}
            local.start_process(name, traffic if name.startswith("party") else None)
        local.wait_ready()
        yield Served(local, local.api_key("admin", "enroll", "verify"))
    finally:
        local.stop()


def sealed_spec() -> TransformSpec:
    meta = json.loads((MODEL_DIR / VERSION / "sealed.json").read_text())
    return TransformSpec.from_dict(meta["transform"])


def faces(count: int, person: str | None = None) -> tuple[list[str], np.ndarray]:
    """``count`` aligned LFW faces: two of ``person`` (default: the first person with two photos), then other
    people's."""
    lfw = lfw_dir()
    images = images_outside_pairs(lfw)
    by_person: dict[str, list[str]] = {}
    for path in images:
        by_person.setdefault(path.split("/")[0], []).append(path)
    pair = by_person[person][:2] if person else next(paths[:2] for paths in by_person.values() if len(paths) >= 2)
    others = [paths[0] for person, paths in by_person.items() if person != pair[0].split("/")[0]][: count - 2]
    chosen = pair + others
    return chosen, load_many(lfw, chosen)


def twin_unit(payload: dict[str, Any]) -> np.ndarray:
    """The plaintext twin: the served layers in float64 on the exact features the SDK sealed."""
    model = load_sealed_model(MODEL_DIR, VERSION)
    x = torch.from_numpy(decode_features(payload).astype(np.float64)[None])
    raw = run_folded(model.layers, x)[0].numpy()
    if model.flip_signs is not None:  # the bundle's test-time flip: e(x) + e(flip x)
        raw = raw + run_folded(model.layers, flip_planes(x, model.flip_signs))[0].numpy()
    return raw / np.linalg.norm(raw)


def set_mode(stack: Any, mode: str) -> dict[str, Any]:
    response = httpx.put(stack.url + "/v1/admin/tenant/mode", json={"mode": mode}, headers=auth(stack.admin),
                         timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def enrollments(stack: Any, subject: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.url}/v1/subjects/{subject}", headers=auth(stack.admin), timeout=30)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()["enrollments"]
    return result


def mpc_jobs(stack: Any) -> list[int]:
    """How many MPC jobs each party has run so far (one engine log line per job, embed jobs included)."""
    return [stack.local.log(f"party{rank}").count("mpc job ") for rank in (0, 1)]


def party_committed(stack: Any) -> list[int]:
    states = httpx.get(stack.url + "/readyz", timeout=30).json()["checks"]["parties"]["states"]
    return [int(s["committed_count"]) for s in states]


def test_sealed_enroll_then_verify_gives_the_twins_decision(stack: Any) -> None:
    out = set_mode(stack, "sealed")
    assert out["mode"] == "sealed" and out["model_version"] == VERSION
    threshold = json.loads((MODEL_DIR / VERSION / "sealed.json").read_text())["threshold"]
    spec = sealed_spec()
    _, images = faces(3, GENUINE)
    payloads = [encode_features(spec.apply(image, OsNoise()).astype(np.float16), spec) for image in images]
    with PrivfaceClient(stack.url, stack.admin, timeout=120, retries=0,
                        sealed_pins=stack.local.sealed_pins) as client:
        assert client.transforms()[0]["mode"] == "sealed" and client.mode == "sealed"
        subject = client.create_subject("sealed-person")["id"]
        enrolled = client.enroll_features(subject, payloads[0])
        assert enrolled["model_version"] == VERSION
        template = twin_unit(payloads[0])
        decisions, traffic = [], []
        # the person's other photo (its job also registers the gallery at the parties, once), the same noised
        # features as enrolled (sealed afresh), another person
        for probe in (payloads[1], dict(payloads[0]), payloads[2]):
            score = float(twin_unit(probe) @ template)
            before = [len(c) for c in stack.calls()]
            bit = client.verify_features(subject, probe)
            traffic.append([c[n:] for c, n in zip(stack.calls(), before)])
            decisions.append((bit, score))
            if abs(score - threshold) > TIE:
                assert bit == (score >= threshold), (score, threshold)
    assert decisions[0][0] is True, decisions  # the person's other photo is accepted: the served model can say yes
    assert decisions[1][0] is True  # a match is opened as a match: the protocol can say yes
    assert decisions[2][0] is False, decisions  # another person, far below the served threshold
    assert traffic[1] == traffic[2] and traffic[1][0], traffic  # the same calls and sizes, match or not
    jobs = [line for line in stack.local.log("party0").splitlines() if "(verify, 1 rows)" in line][-3:]
    assert len({line.rsplit(": ", 1)[-1].rsplit(",", 1)[0] for line in jobs}) == 1, jobs  # same rounds and bytes
    # the threshold those decisions used: the one both parties recorded for the tenant's sealed gallery, which is
    # sealed.json's (review finding 8b: a match at ~1.0 and a stranger far below cannot tell thresholds apart)
    gallery = gallery_name(VERSION, "acme", 1)
    for rank in (0, 1):
        path = stack.local.party_dbs[rank].removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            recorded = db.execute("SELECT threshold FROM galleries WHERE model_version = ?", (gallery,)).fetchall()
        assert recorded == [(threshold,)], (rank, recorded, threshold)
        moved = party_call(stack, rank, "/internal/galleries", {"gallery": gallery, "threshold": threshold - 0.1})
        assert moved.status_code == 409 and moved.json()["type"].endswith("/threshold-fixed"), moved.text


def own_sealed_body(stack: Any, spec: TransformSpec, image: np.ndarray, operation: str
                    ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A sealed payload built here (so the test knows its secrets): the body and {name: secret bytes}."""
    keys = {k["rank"]: k["public_key"] for k in httpx.get(stack.url + "/v1/sealed/keys", headers=auth(stack.admin),
                                                            timeout=30).json()}
    payload = encode_features(spec.apply(image, OsNoise()).astype(np.float16), spec)
    features = decode_features(payload).astype(np.float64)
    fixed = encode_fixed(features)
    shares = split_shares(fixed)
    nonce = os.urandom(16).hex()
    context = {"transform_id": spec.transform_id, "shape": list(spec.shape), "nonce": nonce, "operation": operation,
               "created_at": unix_seconds(payload["created_at"])}
    body = {"transform_id": spec.transform_id, "params_hash": spec.params_hash, "shape": list(spec.shape),
            "epsilon": payload["epsilon"], "nonce": nonce, "created_at": payload["created_at"],
            "envelopes": [seal_share(shares[r], r, keys[r], context) for r in (0, 1)]}
    secrets = {"share 0": shares[0].tobytes(), "share 1": shares[1].tobytes(), "fixed-point features": fixed.tobytes(),
               "float16 features": base64.b64decode(payload["data"]), "float32 features": features.astype("<f4").tobytes(),
               "float64 features": features.tobytes()}
    return body, secrets


def probes(raw: bytes) -> list[bytes]:
    """48-byte windows of a secret at its start and middle, raw and base64 at each of the three alignments a
    base64 encoder could have met them in (any of these in storage would be a leak)."""
    found = []
    for start in (0, len(raw) // 2):
        for shift in range(3):
            window = raw[start + shift: start + shift + 48]
            found += [window, base64.b64encode(window)[:60]]
    return found


def test_the_gateway_stores_and_logs_no_feature_or_share(stack: Any) -> None:
    """After a sealed enrollment, verify and identify (this stack's gateway stores in SQLite and uses no Redis:
    its database files and its log are everything it keeps)."""
    set_mode(stack, "sealed")
    spec = sealed_spec()
    _, images = faces(2)
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(stack.admin)).json()["id"]
    secrets: dict[str, bytes] = {}
    calls = [("enroll", f"/v1/sealed/subjects/{subject}/enrollments", {}, 201, images[0]),
             ("verify", "/v1/sealed/verify", {"subject_id": subject}, 200, images[1]),
             ("identify", "/v1/sealed/identify", {}, 200, images[1])]
    for operation, path, fields, expected, image in calls:
        body, found = own_sealed_body(stack, spec, image, operation)
        response = httpx.post(stack.url + path, json={**fields, "sealed": body}, headers=auth(stack.admin),
                              timeout=120)
        assert response.status_code == expected, (operation, response.text)
        secrets.update({f"{operation}: {name}": raw for name, raw in found.items()})
    stored = Path(stack.local.gateway_db.removeprefix("sqlite:///"))
    log = stack.local.workdir / "gateway.log"
    files = [p for p in stored.parent.glob(stored.name + "*")] + [log]
    assert stored.exists() and log.exists()
    kept = {path.name: path.read_bytes() for path in files}
    for name, raw in secrets.items():
        for probe in probes(raw):
            for where, data in kept.items():
                assert probe not in data, f"{name} in {where}"


def test_a_payload_of_the_other_mode_is_refused_and_changes_nothing(stack: Any) -> None:
    set_mode(stack, "gateway")
    spec_gateway = TransformSpec.from_dict(httpx.get(stack.url + "/v1/transforms", headers=auth(stack.admin),
                                                     timeout=30).json()[0]["spec"])
    _, images = faces(2)
    with PrivfaceClient(stack.url, stack.admin, timeout=120, retries=0,
                        sealed_pins=stack.local.sealed_pins) as client:
        assert client.mode == "gateway"
        subject = client.create_subject()["id"]
        client.enroll_features(subject, encode_features(spec_gateway.apply(images[0], OsNoise()), spec_gateway))
    out = set_mode(stack, "sealed")
    assert out["reenroll_needed"] >= 1  # that subject has no sealed template
    before = (enrollments(stack, subject), party_committed(stack))
    gateway_payload = encode_features(spec_gateway.apply(images[1], OsNoise()), spec_gateway)
    for path, body in ((f"/v1/subjects/{subject}/enrollments", {"features": gateway_payload}),
                       ("/v1/verify", {"subject_id": subject, "features": gateway_payload})):
        response = httpx.post(stack.url + path, json=body, headers=auth(stack.admin), timeout=60)
        assert response.status_code == 409, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith("/tenant-mode")
    back = set_mode(stack, "gateway")
    assert back["reenroll_needed"] == 0 or back["mode"] == "gateway"
    spec = sealed_spec()
    sealed_body = {"sealed": sealed_body_for(stack, spec, images[1])}
    response = httpx.post(f"{stack.url}/v1/sealed/subjects/{subject}/enrollments", json=sealed_body,
                          headers=auth(stack.admin), timeout=60)
    assert response.status_code == 409 and response.json()["type"].endswith("/tenant-mode"), response.text
    assert (enrollments(stack, subject), party_committed(stack)) == before


def sealed_body_for(stack: Any, spec: TransformSpec, image: np.ndarray) -> dict[str, Any]:
    from client.sealed import parse_pins, pinned_keys, sealed_payload

    keys = pinned_keys(httpx.get(stack.url + "/v1/sealed/keys", headers=auth(stack.admin), timeout=30).json(),
                       parse_pins(stack.local.sealed_pins))
    return sealed_payload(dict(encode_features(spec.apply(image, OsNoise()).astype(np.float16), spec)), keys,
                          "enroll")


def test_bad_envelopes_are_refused_with_a_problem_and_change_nothing(stack: Any) -> None:
    set_mode(stack, "sealed")
    spec = sealed_spec()
    _, images = faces(2)
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(stack.admin)).json()["id"]
    good = sealed_body_for(stack, spec, images[0])
    before = (enrollments(stack, subject), party_committed(stack))
    jobs_before = mpc_jobs(stack)

    def tampered(rank: int) -> dict[str, Any]:
        body = sealed_body_for(stack, spec, images[1])  # a fresh, valid payload (its own nonce)...
        cipher = bytearray(base64.b64decode(body["envelopes"][rank]["ciphertext"]))
        cipher[5] ^= 1  # ...with one flipped bit: that envelope no longer authenticates at its party
        body["envelopes"][rank]["ciphertext"] = base64.b64encode(bytes(cipher)).decode()
        return body

    swapped = copy.deepcopy(good)
    swapped["envelopes"].reverse()
    cases = [("swapped addressees", swapped, "/sealed-envelope"), ("party 0 tampered", tampered(0),
                                                                   "/sealed-input-refused"),
             ("party 1 tampered", tampered(1), "/sealed-input-refused")]
    for name, body, slug in cases:
        response = httpx.post(f"{stack.url}/v1/sealed/subjects/{subject}/enrollments", json={"sealed": body},
                              headers=auth(stack.admin), timeout=120)
        assert response.status_code == 422, (name, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith(slug), (name, response.text)
        assert (enrollments(stack, subject), party_committed(stack)) == before, name
        assert mpc_jobs(stack) == jobs_before, name  # refused before any MPC job started at either party
    # the gateway's addressee check aside: each party itself refuses an envelope sealed to its peer (422
    # sealed-envelope), the same envelope given to both, or its own with the peer's key id
    dim = int(load_sealed_model(MODEL_DIR, VERSION).dim)
    eye = base64.b64encode(np.eye(dim).astype("<f8").tobytes()).decode()
    fresh = sealed_body_for(stack, spec, images[1])
    part = {"model": VERSION, "transform_id": fresh["transform_id"], "shape": fresh["shape"], "nonce": fresh["nonce"],
            "operation": "enroll", "created_at": unix_seconds(fresh["created_at"]), "rotation": eye}
    relabelled = {**fresh["envelopes"][0], "key_id": fresh["envelopes"][1]["key_id"]}
    for rank, envelope in ((0, fresh["envelopes"][1]), (1, fresh["envelopes"][0]), (1, relabelled)):
        response = party_call(stack, rank, "/internal/sealed/check", {**part, "envelope": envelope})
        assert response.status_code == 422 and response.json()["type"].endswith("/sealed-envelope"), response.text
    assert mpc_jobs(stack) == jobs_before
    response = httpx.post(f"{stack.url}/v1/sealed/subjects/{subject}/enrollments", json={"sealed": good},
                          headers=auth(stack.admin), timeout=120)
    assert response.status_code == 201, response.text
    assert all(after > was for after, was in zip(mpc_jobs(stack), jobs_before))  # the count above counts jobs


def test_the_cli_seals_by_itself_when_the_tenant_is_sealed(stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main
    from tests.test_client_detect import FACES

    set_mode(stack, "sealed")
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(stack.admin)).json()["id"]
    flags = ["--api-key", stack.admin, "--timeout", "120", "--require-sealed"]
    photo = str(FACES / "James_Caan_0001.jpg")
    other = ",".join(sealed_box.PartyKey.generate().fingerprint for _ in range(2))  # not these parties' keys
    assert main(["--url", stack.url, "enroll", *flags, "--sealed-pins", other, subject, photo]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pinned fingerprint" in err[0], err
    assert enrollments(stack, subject) == []  # nothing was sealed to the wrong keys, nothing stored
    flags += ["--sealed-pins", stack.local.sealed_pins]
    for rank in (0, 1):  # what the operator publishes: each party logs its fingerprint at start
        assert stack.local.sealed_keys[rank].fingerprint in stack.local.log(f"party{rank}")
    assert main(["--url", stack.url, "enroll", *flags, subject, str(FACES / "James_Caan_0001.jpg")]) == 0
    enrolled = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert enrolled["model_version"] == VERSION  # stored through the sealed route: the parties computed it
    assert main(["--url", stack.url, "verify", *flags, subject, str(FACES / "James_Caan_0002.jpg")]) == 0
    # the fixtures' genuine pair, photo to decision: sealed-v6's twin scores it 0.74-0.82 over 40 noise draws
    # (threshold 0.374, sealed-v7 with the same weights 0.461; sealed-v5: 0.67-0.76 against 0.368; sealed-v4: 0.64-0.76 against 0.360; sealed-v3: 0.63-0.73
    # against 0.366)
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"match": True}
    assert "/v1/sealed/verify" in stack.local.log("gateway")


def test_sealed_identify_names_the_enrolled_subject_and_no_one_else(stack: Any) -> None:
    key = stack.local.api_key("admin", "enroll", "verify", tenant="sealed-identify")  # a gallery of its own
    response = httpx.put(stack.url + "/v1/admin/tenant/mode", json={"mode": "sealed"}, headers=auth(key), timeout=30)
    assert response.status_code == 200, response.text
    threshold = json.loads((MODEL_DIR / VERSION / "sealed.json").read_text())["threshold"]  # small N: the 1:1 floor
    spec = sealed_spec()
    _, images = faces(4)
    payloads = [encode_features(spec.apply(image, OsNoise()).astype(np.float16), spec) for image in images]
    with PrivfaceClient(stack.url, key, timeout=120, retries=0,
                        sealed_pins=stack.local.sealed_pins) as client:
        subjects = [client.create_subject()["id"] for _ in range(2)]
        for subject, payload in zip(subjects, (payloads[0], payloads[2])):
            client.enroll_features(subject, payload)
        assert client.identify_features(dict(payloads[2])) == subjects[1]  # the enrolled features, sealed afresh
        stranger = payloads[3]
        best = max(float(twin_unit(stranger) @ twin_unit(p)) for p in (payloads[0], payloads[2]))
        found = client.identify_features(stranger)
        if abs(best - threshold) > TIE:
            assert (found is not None) == (best >= threshold), (found, best, threshold)


def party_call(stack: Any, rank: int, path: str, body: dict[str, Any]) -> httpx.Response:
    """A call straight to a party with its link token: what a gateway (or a holder of its token) can send."""
    return httpx.post(f"http://127.0.0.1:{stack.local.party_ports[rank]}{path}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {stack.local.tokens[rank]}"})


def party_states(stack: Any) -> list[tuple[int, list[int], int]]:
    states = []
    for rank in (0, 1):
        response = httpx.get(f"http://127.0.0.1:{stack.local.party_ports[rank]}/internal/state", timeout=30,
                             headers={"Authorization": f"Bearer {stack.local.tokens[rank]}"})
        state = response.json()
        states.append((int(state["committed_count"]), list(state["pending"]), int(state["jobs_run"])))
    return states


def test_a_replayed_sealed_payload_is_refused_by_both_parties_and_nothing_is_stored(stack: Any) -> None:
    """Review finding 3: the gateway relays each party's SealedIn; resent straight to the parties (as a gateway
    that replays would), an enrollment's or a probe's envelopes are refused by both parties, before any MPC job,
    and nothing is prepared or stored. The rotation sent here is the identity (orthogonal: accepted)."""
    set_mode(stack, "sealed")
    spec = sealed_spec()
    _, images = faces(2)
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(stack.admin)).json()["id"]
    relayed = {}
    for operation, path, fields, expected, image in (
            ("enroll", f"/v1/sealed/subjects/{subject}/enrollments", {}, 201, images[0]),
            ("verify", "/v1/sealed/verify", {"subject_id": subject}, 200, images[1])):
        body, _ = own_sealed_body(stack, spec, image, operation)
        response = httpx.post(stack.url + path, json={**fields, "sealed": body}, headers=auth(stack.admin),
                              timeout=120)
        assert response.status_code == expected, (operation, response.text)
        again = httpx.post(stack.url + path, json={**fields, "sealed": body}, headers=auth(stack.admin), timeout=120)
        assert again.status_code == 409, again.text  # the gateway's own nonce check
        dim = int(load_sealed_model(MODEL_DIR, VERSION).dim)
        eye = base64.b64encode(np.eye(dim).astype("<f8").tobytes()).decode()
        relayed[operation] = [{"model": VERSION, "transform_id": body["transform_id"], "shape": body["shape"],
                               "nonce": body["nonce"], "operation": operation,
                               "created_at": unix_seconds(body["created_at"]), "envelope": body["envelopes"][rank],
                               "rotation": eye} for rank in (0, 1)]
    before = (enrollments(stack, subject), party_states(stack))
    for operation, parts in relayed.items():
        for rank in (0, 1):
            response = party_call(stack, rank, "/internal/sealed/check", parts[rank])
            assert response.status_code == 409, (operation, rank, response.text)
            assert response.json()["type"].endswith("/sealed-replay"), response.text
    gallery = gallery_name(VERSION, "acme", 1)
    for rank in (0, 1):  # the enrollment's envelopes resent as a new enrollment
        prepare = {"seq": 10**9, "gallery": gallery, "template_seq": 10**9, "job_id": "f" * 32,
                   "sealed": relayed["enroll"][rank], "timeout_s": 5}
        response = party_call(stack, rank, "/internal/sealed/prepare", prepare)
        assert response.status_code == 409 and response.json()["type"].endswith("/sealed-replay"), response.text
    assert (enrollments(stack, subject), party_states(stack)) == before  # no MPC job ran, nothing prepared


SPOTS = (0.25, 0.5, 0.75)  # where in each secret the memory-dump test takes its windows


def window(raw: bytes, width: int, at: float) -> bytes:
    """``width`` bytes of ``raw`` from the fraction ``at`` of its length, on an 8-byte boundary (away from the start,
    which a freed heap chunk overwrites with its list pointers)."""
    start = int(len(raw) * at) // 8 * 8
    return raw[start: start + width]


def clear_feature_probes(payload: FeaturePayload, label: str, spots: tuple[float, ...]) -> dict[str, bytes]:
    """What the features of ``payload`` look like in a process's memory if it has them in the clear: 32 values as
    float16 (the wire form), float32 (what the gateway's model reads) and float64, and 64 characters of the
    payload's base64 text (the request body), one window per fraction in ``spots``."""
    values = decode_features(payload)
    forms = {"float16": values.tobytes(), "float32": values.astype("<f4").tobytes(),
             "float64": values.astype("<f8").tobytes(), "base64": payload["data"].encode()}
    widths = {"float16": 64, "float32": 128, "float64": 256, "base64": 64}
    return {f"{label} {form} @{at}": window(raw, widths[form], at) for form, raw in forms.items() for at in spots}


def sealed_probes(payload: FeaturePayload, shares: tuple[np.ndarray, ...], label: str, spots: tuple[float, ...]
                  ) -> dict[str, bytes]:
    """The clear features of a sealed request, the fixed-point features the SDK encoded, and each party's share
    (32 int64 values each)."""
    fixed, first, second = (np.ascontiguousarray(a, dtype="<i8").tobytes() for a in shares)
    found = clear_feature_probes(payload, label, spots)
    for name, raw in (("fixed-point", fixed), ("share 0", first), ("share 1", second)):
        found.update({f"{label} {name} @{at}": window(raw, 256, at) for at in spots})
    return found


def test_a_memory_dump_holds_no_clear_feature_or_share_at_the_gateway_and_only_its_own_share_at_a_party(
        stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: the gateway's memory (every readable mapping a process can write, of the gateway process and its
    children, read through /proc/<pid>/mem while and after the SDK's requests run) holds none of the clear
    features, their fixed-point encoding or either share of a sealed enrollment and verify; each party's memory
    holds its own shares but not the other's, nor the features. Positive controls, so that no search
    passes vacuously: in gateway mode the same search finds the probe's features in the gateway's memory, and
    each party's search finds its own share."""
    gateway = stack.local.processes["gateway"].pid
    if not can_read_memory(gateway):
        pytest.skip("reading another process's memory needs root (or ptrace_scope 0)")
    _, images = faces(2)
    set_mode(stack, "gateway")
    with PrivfaceClient(stack.url, stack.admin, timeout=120, retries=0) as client:
        spec = client.transform
        subject = client.create_subject()["id"]
        client.enroll_features(subject, encode_features(spec.apply(images[0], OsNoise()), spec))
        probe = encode_features(spec.apply(images[1], OsNoise()), spec)
        client.verify_features(subject, probe)
    found, read = find_in_memory(process_tree(gateway), clear_feature_probes(probe, "gateway-mode probe", SPOTS))
    assert read > 0 and found, "positive control: gateway mode's clear probe is in the gateway's memory"

    set_mode(stack, "sealed")
    made: list[tuple[np.ndarray, ...]] = []  # what the SDK encoded and split, per request (the real functions run)
    sent = threading.Event()
    real_split = client_sealed.split_shares

    def recording_split(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shares = real_split(encoded)
        made.append((np.array(encoded), *shares))
        sent.set()
        return shares

    monkeypatch.setattr(client_sealed, "split_shares", recording_split)
    spec = sealed_spec()
    payloads = [encode_features(spec.apply(image, OsNoise()).astype(np.float16), spec) for image in images]
    with PrivfaceClient(stack.url, stack.admin, timeout=120, retries=0,
                        sealed_pins=stack.local.sealed_pins) as client, ThreadPoolExecutor(1) as pool:
        subject = client.create_subject()["id"]
        client.enroll_features(subject, payloads[0])
        sent.clear()
        verify = pool.submit(client.verify_features, subject, payloads[1])
        assert sent.wait(60)  # the probe's shares exist: the SDK is sending them; dump the gateway meanwhile
        during, _ = find_in_memory(process_tree(gateway), sealed_probes(payloads[1], made[-1], "probe", SPOTS))
        verify.result()
    assert len(made) == 2, len(made)
    assert not during, during
    secrets = {**sealed_probes(payloads[0], made[0], "enrollment", SPOTS),
               **sealed_probes(payloads[1], made[1], "probe", SPOTS)}
    after, read = find_in_memory(process_tree(gateway), secrets)
    assert read > 0 and not after, after
    for rank in (0, 1):
        held, _ = find_in_memory(process_tree(stack.local.processes[f"party{rank}"].pid), secrets)
        own = {f"{label} share {rank} @{at}" for label in ("enrollment", "probe") for at in SPOTS}
        assert held and held <= own, (rank, held)  # its own shares only (found: the positive control)


def sealed_body_of_fixed(stack: Any, spec: TransformSpec, fixed: np.ndarray, operation: str) -> dict[str, Any]:
    """A sealed payload whose fixed-point features are ``fixed`` (any int64, as a client that bypasses the SDK's
    range check could send): split and sealed to the parties' keys like the SDK's."""
    keys = {k["rank"]: k["public_key"] for k in httpx.get(stack.url + "/v1/sealed/keys", headers=auth(stack.admin),
                                                            timeout=30).json()}
    nonce, created_at = os.urandom(16).hex(), utc_now()
    context = {"transform_id": spec.transform_id, "shape": list(spec.shape), "nonce": nonce, "operation": operation,
               "created_at": unix_seconds(created_at)}
    shares = split_shares(fixed)
    return {"transform_id": spec.transform_id, "params_hash": spec.params_hash, "shape": list(spec.shape),
            "epsilon": spec.epsilon_per_image, "nonce": nonce, "created_at": created_at,
            "envelopes": [seal_share(shares[r], r, keys[r], context) for r in (0, 1)]}


def test_huge_sealed_features_never_match_and_out_of_range_ones_are_refused_by_the_sdk(stack: Any) -> None:
    """Review item 8d (docs/security.md, sealed mode): the gateway cannot bound features it cannot see, so a client
    that scales a matching probe up (the scaled-query attack) must gain nothing. The enrolled features themselves,
    which match as they are, scaled by 1e4, 1e6 and up to the largest magnitude the fixed-point encoding takes, and
    ring values beyond it (which only a client bypassing the SDK makes), answer "no match" at verify and identify,
    never an error; the SDK refuses features out of the encoding's range (inf in float16) before sending anything."""
    set_mode(stack, "sealed")
    spec = sealed_spec()
    _, images = faces(1)
    enrolled = encode_features(spec.apply(images[0], OsNoise()).astype(np.float16), spec)
    features = decode_features(enrolled).astype(np.float64)
    with PrivfaceClient(stack.url, stack.admin, timeout=120, retries=0,
                        sealed_pins=stack.local.sealed_pins) as client:
        subject = client.create_subject()["id"]
        client.enroll_features(subject, enrolled)
        assert client.verify_features(subject, dict(enrolled)) is True  # as they are, these features match
        largest = np.nextafter(MAX_ABS, 0)  # the top scale's rounding clipped back under the range
        scales = (1e4, 1e6, largest / float(np.max(np.abs(features))))
        fixed = [encode_fixed(np.clip(features * scale, -largest, largest)) for scale in scales]
        fixed.append(np.where(features < 0, -(2**62), 2**62).astype(np.int64))  # beyond the encoding's range
        for values in fixed:
            body = {"subject_id": subject, "sealed": sealed_body_of_fixed(stack, spec, values, "verify")}
            response = httpx.post(stack.url + "/v1/sealed/verify", json=body, headers=auth(stack.admin), timeout=120)
            assert response.status_code == 200 and response.json()["match"] is False, response.text
        body = {"sealed": sealed_body_of_fixed(stack, spec, fixed[1], "identify")}
        response = httpx.post(stack.url + "/v1/sealed/identify", json=body, headers=auth(stack.admin), timeout=120)
        assert response.status_code == 200 and response.json()["subject_id"] is None, response.text
        with pytest.raises(ValueError, match="fixed-point range"):
            encode_fixed(np.array([MAX_ABS]))  # 2^47 * 2^16 is 2^63: it would wrap to -2^63
        infinite = decode_features(enrolled).copy()
        infinite.flat[0] = np.inf
        before = stack.calls()
        with pytest.raises(InvalidFeaturesError, match="fixed-point range"):  # the SDK's own error, a ValueError too
            client.verify_features(subject, encode_features(infinite, spec))
        assert stack.calls() == before  # refused in the SDK: nothing reached the parties
