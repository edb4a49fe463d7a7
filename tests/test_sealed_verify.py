"""Sealed enroll + verify end to end at the process level (issue 12): the SDK seals each photo's features to the
two parties' published keys, each party opens only its own share, enrolls and verifies under MPC with the dealer,
and only the decision bit is opened. Held-out pairs of LFW folds 6-10 (1 genuine + 1 impostor per fold)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from common.paths import PROJECT_ROOT

TIE = 2e-3  # fixed-point tolerance on a score (tests/test_sealed_mpc.py bounds the embedding error)


def test_sealed_verify_accepts_genuine_refuses_impostors_and_equals_the_twin(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    out = tmp_path / "verify"
    cmd = [sys.executable, "-m", "bench.sealed_verify", "--pairs-per-fold", "2", "--out", str(out)]
    subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, check=True, timeout=900, capture_output=True)
    result = json.loads((out / "result.json").read_text())
    assert result["pairs"] == 10 and result["genuine"] == 5
    if result["twin_margin_min"] > TIE:  # no pair sits on the threshold: every sealed bit is the twin's
        assert result["twin_decisions_equal"] == result["pairs"]
    assert result["sealed_accepts_genuine"] >= 1 and result["sealed_refuses_impostor"] >= 1
    # the relayed requests held only ciphertext: each envelope opens at its own party only (test_sealed_box.py)
    requests = json.loads((out / "requests.json").read_text())
    envelope = requests["verify"][0]["envelopes"][0]
    assert set(envelope) == {"scheme", "party", "key_id", "epk", "nonce", "ciphertext"}
