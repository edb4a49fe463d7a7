"""Statistical check that one party's shares look uniform, whatever the secret — and that the check has teeth.

Fixed significance: alpha = 1e-6 per statistic (so a correct generator fails with negligible probability),
applied to (a) a chi-square test on the 256 byte values, (b) a per-bit-position balance test (64 positions,
Bonferroni-corrected), (c) a chi-square test on the top 8 bits of each element (the sign/magnitude region,
where "small share" bugs show).
"""
from __future__ import annotations

import os
import random

import numpy as np
from scipy import stats

from secure import fixedpoint as fp
from secure import sharing

ALPHA = 1e-6


def uniformity_failures(shares: np.ndarray) -> list[str]:
    """Names of the uniformity tests that reject at ALPHA (empty: looks uniform)."""
    failures = []
    raw = np.ascontiguousarray(shares, dtype="<i8").view(np.uint8).ravel()
    counts = np.bincount(raw, minlength=256)
    if stats.chisquare(counts).pvalue < ALPHA:
        failures.append("bytes")
    u = np.ascontiguousarray(shares, dtype="<i8").view(np.uint64).ravel()
    n = u.size
    bits = ((u[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).sum(axis=0).astype(np.float64)
    z = (bits - n / 2) / np.sqrt(n / 4)
    if (2 * stats.norm.sf(np.abs(z))).min() < ALPHA / 64:
        failures.append("bits")
    top = np.bincount((u >> np.uint64(56)).astype(np.int64), minlength=256)
    if stats.chisquare(top).pvalue < ALPHA:
        failures.append("top-byte")
    return failures


def structured_secrets(count: int, d: int) -> np.ndarray:
    """Very non-uniform secrets: small fixed-point values, many zeros, one constant column."""
    rng = np.random.default_rng(7)
    x = rng.normal(0, 0.05, size=(count, d))
    x[:, ::4] = 0.0
    x[:, 1] = 0.25
    return fp.encode(x)


def test_party_shares_look_uniform():
    secrets = structured_secrets(4000, 32)  # 128k ring elements, 1 MiB of share bytes per party
    s0, s1 = sharing.split(secrets)
    assert uniformity_failures(s0) == []
    assert uniformity_failures(s1) == []
    assert uniformity_failures(secrets) != []  # the secrets themselves are far from uniform


def test_detector_catches_biased_generators():
    secrets = structured_secrets(4000, 32)

    def sign_bit_cleared(n: int) -> bytes:  # e.g. shares drawn with randbits(63): never negative
        b = bytearray(os.urandom(n))
        b[7::8] = bytes(x & 0x7F for x in b[7::8])
        return bytes(b)

    def small_shares(n: int) -> bytes:  # e.g. shares drawn from [-2**40, 2**40)
        vals = np.frombuffer(os.urandom(n), "<i8") >> np.int64(23)
        return vals.astype("<i8").tobytes()

    def slightly_biased(n: int) -> bytes:  # one byte value 0x00 over-represented by ~25%
        b = bytearray(os.urandom(n))
        r = random.Random(1)
        for i in range(0, n, 1024):
            b[i + r.randrange(1024) if i + 1024 <= n else i] = 0
        return bytes(b)

    for gen in (sign_bit_cleared, small_shares, slightly_biased):
        s0, s1 = sharing.split(secrets, randbytes=gen)
        assert np.array_equal(sharing.reconstruct(s0, s1), secrets)  # still correct sharing...
        assert uniformity_failures(s0) != [], gen.__name__  # ...but detectably non-uniform
