"""What the servers keep: one party's shares look uniform, and no database or log holds a plaintext
embedding, template or score."""
from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy import stats

from app.auth import tenant_template_key
from devtools.localstack import LocalStack
from inference.metadata import ModelMetadata
from inference.protect import protect_embedding
from inference.runtime import OrtEmbedder
from secure.fixedpoint import encode
from tests.test_gateway_api import aligned_face, auth, payload
from tests.test_gateway_recovery import FACES, served_spec

pytestmark = pytest.mark.slow


def decode_payload(body: dict) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(body["data"]), "<f2").reshape(body["shape"]).astype(np.float32)


def needles(values: np.ndarray) -> list[bytes]:
    """Byte patterns that would betray these values: float32/float64/fixed-point bytes and decimal text."""
    head = np.asarray(values[:4])
    patterns = [head.astype("<f4").tobytes(), head.astype("<f8").tobytes(), encode(head).astype("<i8").tobytes()]
    patterns += [f"{v:.6f}".encode() for v in head if abs(v) > 1e-3]
    return patterns


DECIMAL = re.compile(rb"-?\d+\.\d{6}")


def betrays(needle: bytes, content: bytes) -> bool:
    """Whether `content` holds the needle. A decimal needle counts only where no digit precedes it: a timestamp's
    "13:36:10.020566" holds the text "0.020566" by chance (about one run in a few hundred), a value written out
    does not follow a digit. Binary needles count anywhere."""
    if DECIMAL.fullmatch(needle):
        return re.search(rb"(?<![0-9])" + re.escape(needle), content) is not None
    return needle in content


def files_of(stack: LocalStack) -> list[Path]:
    return [p for p in stack.workdir.iterdir() if p.is_file()]


def test_shares_uniform_and_nothing_plaintext_at_rest_or_in_logs(tmp_path, shared):
    stack = LocalStack(tmp_path).start()
    try:
        key = stack.api_key("enroll", "verify")
        spec = served_spec(stack, key)
        meta = ModelMetadata.load(stack.model_dir / "v0")
        embedder = OrtEmbedder(stack.model_dir / "v0" / meta.onnx_file, prefer_gpu=False)
        secrets_to_find: list[bytes] = []
        for name in FACES * 4:
            body = payload(spec, aligned_face(shared, name))
            embedding = embedder.embed(decode_payload(body)[None])[0]
            template = protect_embedding(embedding, tenant_template_key(stack.secret, "acme", 1), "v0", 1)
            secrets_to_find += needles(embedding) + needles(template)
            subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
            response = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": body},
                                  headers=auth(key), timeout=60)
            assert response.status_code == 201, response.text
            probe = payload(spec, aligned_face(shared, name))
            probe_template = protect_embedding(embedder.embed(decode_payload(probe)[None])[0],
                                               tenant_template_key(stack.secret, "acme", 1), "v0", 1)
            score = float(probe_template @ template)
            secrets_to_find += needles(probe_template) + [f"{score:.6f}".encode(), repr(score).encode()]
            verify = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": probe},
                                headers=auth(key), timeout=60)
            assert verify.status_code == 200 and verify.json()["match"] is True
        stack.stop()

        for rank in (0, 1):
            # closed here, not when collected: closing checkpoints and deletes the -wal file that opening made,
            # which must not happen while the files are listed and read below
            with contextlib.closing(sqlite3.connect(stack.party_dbs[rank].removeprefix("sqlite:///"))) as conn:
                shares = b"".join(row[0] for row in conn.execute("SELECT share FROM shares"))
            counts = np.bincount(np.frombuffer(shares, np.uint8), minlength=256)
            assert len(shares) == 20 * meta.embedding_dim * 8
            # Thresholds a uniform source crosses about once in a million checks, ~2e-6 per run for both parties
            # (1e-3 failed one CI run at p = 3e-4); a template in the clear gives p = 0 (fixed-point high bytes).
            assert stats.chisquare(counts).pvalue > 1e-6, f"party {rank} shares are not uniform bytes"
            bits = np.unpackbits(np.frombuffer(shares, np.uint8))
            assert abs(bits.mean() - 0.5) < 5.5 * 0.5 / np.sqrt(bits.size)

        for path in files_of(stack):
            content = path.read_bytes()
            for needle in secrets_to_find:
                assert not betrays(needle, content), f"{path.name} contains a plaintext value ({needle!r})"
    finally:
        stack.stop()


def test_a_decimal_needle_inside_a_timestamp_is_not_a_leak_but_a_written_value_is():
    assert not betrays(b"0.020566", b"created 2026-12-07 13:36:10.020566 acme")
    assert betrays(b"0.020566", b'{"score": 0.020566}') and betrays(b"-0.020566", b"[-0.020566,")
    assert betrays(np.float32(0.5).tobytes(), b"x1" + np.float32(0.5).tobytes())  # binary needles count anywhere
