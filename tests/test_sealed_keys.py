"""Sealed mode (issue 12) on the real stack: each party publishes its own X25519 key through the gateway
(`GET /v1/sealed/keys`), the SDK seals a real face's feature shares to those keys, and only the party addressed can
open its share."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from client.sealed import seal_features
from devtools.localstack import LocalStack
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.transform import PRESETS, OsNoise, apply
from secure import sealed_box, sharing
from tests.test_gateway_api import auth

pytestmark = pytest.mark.slow


def test_parties_publish_their_keys_through_the_gateway_and_only_they_open_their_share(tmp_path):
    keys = {rank: sealed_box.PartyKey.generate() for rank in (0, 1)}
    stack = LocalStack(tmp_path)
    stack.cli("models", "ensure")
    try:
        stack.start_process("dealer")
        for rank in (0, 1):
            stack.start_process(f"party{rank}", {"PRIVFACE_PARTY_SEALED_KEY": keys[rank].private_b64()})
        stack.start_process("gateway")
        stack.wait_ready()
        api_key = stack.api_key("verify")
        assert httpx.get(stack.url + "/v1/sealed/keys").status_code == 401
        response = httpx.get(stack.url + "/v1/sealed/keys", headers=auth(api_key), timeout=30)
        assert response.status_code == 200, response.text
        published = response.json()
        assert [k["rank"] for k in published] == [0, 1]
        for rank in (0, 1):
            assert published[rank]["public_key"] == keys[rank].public_b64
            assert published[rank]["key_id"] == keys[rank].key_id
            assert published[rank]["scheme"] == sealed_box.SCHEME

        lfw = lfw_dir()
        spec = PRESETS["dct8-v0"](64.0)
        features = apply(load_many(lfw, images_outside_pairs(lfw)[:1]), spec, OsNoise())[0].astype(np.float32)
        context = {"transform_id": spec.transform_id, "shape": list(features.shape), "nonce": "req-1",
                   "operation": "verify", "created_at": 1_796_000_000}
        envelopes = seal_features(features, {k["rank"]: k["public_key"] for k in published}, context)
        shares = [sealed_box.open_share(dict(envelopes[r]), r, keys[r], context) for r in (0, 1)]
        assert np.array_equal(sharing.reconstruct(*shares), np.rint(features.astype(np.float64) * 65536))
        with pytest.raises(sealed_box.SealedError):
            sealed_box.open_share(dict(envelopes[0]), 1, keys[1], context)
    finally:
        stack.stop()
