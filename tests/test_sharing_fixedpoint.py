"""Fixed-point encoding (CrypTen's 16 fractional bits) and additive sharing over Z_2^64."""
from __future__ import annotations

import numpy as np
import pytest

from secure import fixedpoint as fp
from secure import sharing


def test_scale_is_crypten_default():
    assert fp.PRECISION_BITS == 16 and fp.SCALE == 65536


def test_encode_decode_roundtrip():
    x = np.linspace(-3, 3, 1001)
    enc = fp.encode(x)
    assert enc.dtype == np.int64
    assert np.max(np.abs(fp.decode(enc) - x)) <= 0.5 / fp.SCALE + 1e-12
    assert fp.encode(1.0) == 65536 and fp.encode(-0.5) == -32768


def test_trunc_matches_crypten_encoder_formula():
    x = np.array([0.3, -0.3, 1.99999, -1.99999, 12.25])
    # CrypTen 0.4.1 FixedPointEncoder.encode: (scale * x).long(), i.e. truncation toward zero
    expected = np.array([int(65536 * v) for v in x], dtype=np.int64)
    assert np.array_equal(fp.encode(x, rounding="trunc"), expected)


def test_encode_rejects_bad_values():
    with pytest.raises(ValueError):
        fp.encode(np.array([np.nan]))
    with pytest.raises(ValueError):
        fp.encode(np.array([2.0**50]))


def test_dot_product_decodes():
    a, b = np.array([0.5, -0.25, 0.125]), np.array([0.1, 0.2, -0.3])
    raw = int(np.dot(fp.encode(a), fp.encode(b)))
    assert abs(float(fp.decode_product(raw)) - float(a @ b)) < 1e-4


def test_split_reconstruct_wraps():
    edge = np.array([0, 1, -1, np.iinfo(np.int64).max, np.iinfo(np.int64).min, 123456789], dtype=np.int64)
    for _ in range(20):
        s0, s1 = sharing.split(edge)
        assert s0.dtype == s1.dtype == np.int64
        assert np.array_equal(sharing.reconstruct(s0, s1), edge)
    s0, s1 = sharing.split(np.zeros((3, 4), np.int64))
    assert s0.shape == (3, 4) and np.array_equal(sharing.reconstruct(s0, s1), np.zeros((3, 4), np.int64))


def test_reconstruct_int_and_serialisation():
    s0, s1 = sharing.split(np.array([-7], np.int64))
    assert sharing.reconstruct_int(int(s0[0]) % 2**64, int(s1[0]) % 2**64) == -7
    v = np.array([1, -2, 2**40], np.int64)
    assert np.array_equal(sharing.from_b64(sharing.to_b64(v), dim=3), v)
    assert sharing.to_bytes(np.array([1], np.int64)) == b"\x01" + b"\x00" * 7  # little-endian
    with pytest.raises(ValueError):
        sharing.from_b64(sharing.to_b64(v), dim=4)
    with pytest.raises(ValueError):
        sharing.from_b64("not base64!!")
    with pytest.raises(TypeError):
        sharing.split(np.array([0.5]))


def test_shares_differ_each_time():
    x = fp.encode(np.full(64, 0.1))
    a0, _ = sharing.split(x)
    b0, _ = sharing.split(x)
    assert not np.array_equal(a0, b0)
