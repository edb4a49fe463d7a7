"""Pure-python pieces of the MPC engine (no processes): threshold encoding, job agreement, validation."""
from __future__ import annotations

import numpy as np
import pytest

from secure.mpc.engine import MatchJob, MpcEngine, MpcUnavailable, _validate
from secure.mpc.protocols.base import RAW_SCALE, threshold_raw
from secure.mpc.settings import MpcSettings
from secure.mpc.runtime.coalesce import job_digest


def test_threshold_raw_is_exact_ceiling() -> None:
    assert threshold_raw(0.5) == RAW_SCALE // 2
    assert threshold_raw(-0.25) == -(RAW_SCALE // 4)
    t = 0.3141592653589793
    raw = threshold_raw(t)
    assert raw / RAW_SCALE >= t and (raw - 1) / RAW_SCALE < t


def test_digest_covers_every_public_parameter() -> None:
    lab = np.arange(1, 6, dtype=np.int64)
    base = job_digest("verify", 5, 128, 0.5, lab, "cpu")
    assert base == job_digest("verify", 5, 128, 0.5, lab.copy(), "cpu")
    others = [job_digest("identify", 5, 128, 0.5, lab, "cpu"), job_digest("verify", 5, 127, 0.5, lab, "cpu"),
              job_digest("verify", 5, 128, 0.5 + 1e-12, lab, "cpu"), job_digest("verify", 5, 128, 0.5, lab + 1, "cpu"),
              job_digest("verify", 5, 128, 0.5, lab, "cuda")]
    assert base not in others


def _job(**kw) -> MatchJob:  # noqa: ANN003
    args = {"job_id": "a" * 32, "kind": "verify", "query_share": np.zeros(4, np.int64),
            "gallery_share": np.zeros((3, 4), np.int64), "labels": np.arange(1, 4, dtype=np.int64), "threshold": 0.5}
    args.update(kw)
    return MatchJob(**args)


def test_validation_rejects_malformed_jobs() -> None:
    _validate(_job())
    for bad in ({"kind": "search"}, {"query_share": np.zeros(5, np.int64)}, {"labels": np.arange(2, dtype=np.int64)},
                {"gallery_share": np.zeros((3, 4), np.float64)}, {"threshold": float("nan")}, {"job_id": ""}):
        with pytest.raises(ValueError):
            _validate(_job(**bad))


def test_unstarted_engine_refuses_fast_and_empty_gallery_is_zero() -> None:
    eng = MpcEngine(0, MpcSettings())
    with pytest.raises(MpcUnavailable):
        eng.submit(_job(), timeout=5)
    assert eng.submit(_job(gallery_share=np.zeros((0, 4), np.int64), labels=np.zeros(0, np.int64)), 5) == 0
    assert eng.status() == {"connected": False, "generation": 0, "provider": "TTP", "last_error": None}
