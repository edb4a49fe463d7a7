"""Sealed mode: the SDK trusts only party keys pinned out of band (review finding 1) and can refuse a downgrade to
gateway mode (finding 2). The gateway here is a hostile stand-in (an httpx transport answering as a gateway that
substitutes its own keys, fakes a refusal or claims gateway mode); the features are real LFW faces (training
identities, outside View-2 folds 6-10)."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from client import sealed as client_sealed
from client.errors import InvalidRequestError, PrivfaceError
from client.features import FeaturePayload, encode_features
from client.sdk import PrivfaceClient
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.transform import PRESETS, OsNoise
from secure import sealed_box

SPEC = PRESETS["dct8-v0"](64.0)
PARTIES = {rank: sealed_box.PartyKey.generate() for rank in (0, 1)}
PINS = ",".join(PARTIES[rank].fingerprint for rank in (0, 1))


@pytest.fixture(scope="module")
def payload() -> FeaturePayload:
    lfw = lfw_dir()
    face = load_many(lfw, images_outside_pairs(lfw)[:1])[0]
    return encode_features(SPEC.apply(face, OsNoise()).astype(np.float16), SPEC)


def published(keys: dict[int, sealed_box.PartyKey]) -> list[dict[str, Any]]:
    return [{"rank": r, "scheme": sealed_box.SCHEME, "public_key": k.public_b64, "key_id": k.key_id}
            for r, k in keys.items()]


class Gateway:
    """A stand-in gateway: records every request and answers from ``reply(request)``."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response], mode: str = "sealed") -> None:
        self.requests: list[httpx.Request] = []
        self.reply, self.mode = reply, mode

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/v1/transforms":
            return httpx.Response(200, json=[{"mode": self.mode, "transform_id": SPEC.transform_id}])
        return self.reply(request)

    def client(self, **options: Any) -> PrivfaceClient:
        client = PrivfaceClient("http://gw", "k", transform=SPEC, retries=1, backoff_s=0.0, **options)
        client._http = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(self.handle))
        return client

    def posts(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]


def honest(keys: dict[int, sealed_box.PartyKey], then: Callable[[httpx.Request], httpx.Response]) -> Callable[
        [httpx.Request], httpx.Response]:
    def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/sealed/keys":
            return httpx.Response(200, json=published(keys))
        return then(request)
    return reply


def matched(_: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"match": True})


def test_pinned_keys_accept_only_the_pinned_fingerprints() -> None:
    pins = client_sealed.parse_pins(PINS)
    assert client_sealed.pinned_keys(published(PARTIES), pins) == {r: PARTIES[r].public_b64 for r in (0, 1)}
    own = {0: sealed_box.PartyKey.generate(), 1: PARTIES[1]}  # the gateway's own key, with a correct key id
    with pytest.raises(ValueError, match="party 0's sealed key does not match its pinned fingerprint"):
        client_sealed.pinned_keys(published(own), pins)
    wrong_id = published(PARTIES)
    wrong_id[1]["key_id"] = PARTIES[0].key_id
    with pytest.raises(ValueError, match="matching its key id"):
        client_sealed.pinned_keys(wrong_id, pins)
    for bad in ("", PARTIES[0].fingerprint, "zz" * 32 + "," + PARTIES[1].fingerprint):
        with pytest.raises(ValueError, match="two SHA-256 fingerprints"):
            client_sealed.parse_pins(bad)


def test_the_sdk_never_seals_to_keys_the_gateway_substitutes(payload: FeaturePayload) -> None:
    gateway = Gateway(honest({0: sealed_box.PartyKey.generate(), 1: sealed_box.PartyKey.generate()}, matched))
    with gateway.client(sealed_pins=PINS) as client, pytest.raises(PrivfaceError, match="pinned fingerprint"):
        client.verify_features("s", payload)
    assert gateway.posts() == []  # nothing was sealed, nothing sent
    gateway = Gateway(honest(PARTIES, matched))
    with gateway.client(sealed_pins="") as client, pytest.raises(PrivfaceError, match="no pinned key fingerprints"):
        client.verify_features("s", payload)
    assert gateway.posts() == []


def test_a_refused_envelope_is_never_resealed_and_a_retry_reuses_the_pinned_keys(payload: FeaturePayload) -> None:
    refused = httpx.Response(422, json={"type": "https://privface.dev/problems/sealed-input-refused", "status": 422})
    gateway = Gateway(honest(PARTIES, lambda _: refused))
    with gateway.client(sealed_pins=PINS) as client, pytest.raises(InvalidRequestError):
        client.verify_features("s", payload)
    assert len(gateway.posts()) == 1  # a faked 422 gets no second sealing (to whatever keys come next)
    assert [r.url.path for r in gateway.requests].count("/v1/sealed/keys") == 1
    answers = iter([httpx.Response(503, json={"status": 503}), httpx.Response(200, json={"match": True})])
    gateway = Gateway(honest(PARTIES, lambda _: next(answers)))
    with gateway.client(sealed_pins=PINS) as client:
        assert client.verify_features("s", payload) is True
    first, second = (body["sealed"] for body in gateway.posts())
    assert first["nonce"] != second["nonce"]  # fresh shares under a fresh nonce...
    assert [e["key_id"] for e in first["envelopes"]] == [e["key_id"] for e in second["envelopes"]] == [
        PARTIES[0].key_id, PARTIES[1].key_id]  # ...to the same pinned keys
    assert first["envelopes"][0]["ciphertext"] != second["envelopes"][0]["ciphertext"]


def test_require_sealed_refuses_a_gateway_that_downgrades(payload: FeaturePayload) -> None:
    gateway = Gateway(matched, mode="gateway")
    with gateway.client(sealed_pins=PINS, require_sealed=True) as client:
        for send in (lambda: client.verify_features("s", payload), lambda: client.identify_features(payload),
                     lambda: client.enroll_features("s", payload)):
            with pytest.raises(PrivfaceError, match="requires sealed mode"):
                send()
    assert gateway.posts() == []
    with Gateway(matched, mode="gateway").client() as client:
        assert client.verify_features("s", payload) is True  # without the option, gateway mode still works


def test_the_party_prints_its_fingerprint(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from privface.cli import main as privface_main

    monkeypatch.setenv("PRIVFACE_PARTY_SEALED_KEY", PARTIES[0].private_b64())
    assert privface_main(["sealed-fingerprint"]) == 0
    assert capsys.readouterr().out.strip() == PARTIES[0].fingerprint
    monkeypatch.delenv("PRIVFACE_PARTY_SEALED_KEY")
    assert privface_main(["sealed-fingerprint"]) == 2
    assert "unset" in capsys.readouterr().err
