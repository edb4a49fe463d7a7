"""The gateway's precheck before an MPC job: always, or only after a job on the gallery did not run at both parties.

Two real party servers (uvicorn subprocesses, SQLite) with the test-only plaintext engine of tests/party_harness.py;
each party records the calls it receives (``PRIVFACE_PARTY_TRAFFIC_LOG``), so the tests count the prechecks the
parties actually got, not only what the coordinator says it sent.
"""
from __future__ import annotations

import asyncio
from typing import cast

import numpy as np
import pytest

from secure import fixedpoint as fp
from secure.coordinator import PartiesOutOfSync, PartyPair
from secure.precheck import PrecheckMode, PrecheckPolicy
from tests.test_party_integration import THRESHOLD, TOKEN, Party, unit_vectors

pytestmark = pytest.mark.slow
CHECK = "POST /internal/match/check "
MATCH = "POST /internal/match "


@pytest.fixture
def logged_parties(tmp_path, monkeypatch):
    """Two SQLite parties, each writing its traffic log (the harness inherits the environment)."""
    parties = []
    try:
        for rank in (0, 1):
            monkeypatch.setenv("PRIVFACE_PARTY_TRAFFIC_LOG", str(tmp_path / f"party{rank}.traffic"))
            party = Party(rank, f"sqlite:///{tmp_path / f'party{rank}.db'}", tmp_path / "rendezvous", tmp_path)
            party.start()
            parties.append(party)
        yield parties
    finally:
        for party in parties:
            party.stop()


def calls(party: Party, prefix: str) -> int:
    path = party.log_dir / f"party{party.rank}.traffic"  # the fixture's PRIVFACE_PARTY_TRAFFIC_LOG
    return sum(line.startswith(prefix) for line in path.read_text().splitlines()) if path.exists() else 0


def run(coro):
    return asyncio.run(coro)


def unit(v: np.ndarray) -> np.ndarray:
    return fp.encode(v / np.linalg.norm(v))


def test_after_refusal_skips_the_check_while_jobs_run_and_checks_again_after_a_refusal(logged_parties):
    ps = logged_parties
    faces = unit_vectors(5, seed=11)

    def counts() -> tuple[int, int]:
        return calls(ps[0], CHECK), calls(ps[1], CHECK)

    async def scenario():
        async with PartyPair((ps[0].url, ps[1].url), TOKEN, 5, precheck="after-refusal") as pair:
            for t in (1, 2):
                assert await pair.store(t, t, "g", fp.encode(faces[t]))
                assert await pair.commit(t) == (True, True)
            genuine, impostor = unit(faces[1] + 0.01), fp.encode(faces[4])
            # the gallery's first job is checked; the jobs after it are not, whatever they decide
            assert await pair.identify("a1", "g", 2, genuine, THRESHOLD, expected_committed=2) == 1
            assert counts() == (1, 1)
            assert await pair.identify("a2", "g", 2, impostor, THRESHOLD, expected_committed=2) is None
            assert await pair.verify("a3", "g", 2, genuine, [1], THRESHOLD, expected_committed=2) is True
            assert await pair.verify("a4", "g", 2, impostor, [2], THRESHOLD, expected_committed=2) is False
            assert counts() == (1, 1) and pair.precheck.sent == 1
            assert (calls(ps[0], MATCH), calls(ps[1], MATCH)) == (4, 4)
            # another gallery starts checked
            assert await pair.store(3, 3, "h", fp.encode(faces[3]))
            assert await pair.commit(3) == (True, True)
            assert await pair.identify("b1", "h", 3, fp.encode(faces[3]), THRESHOLD, expected_committed=3) == 3
            assert counts() == (2, 2)

            # party 1 misses a decision: the unchecked job goes out and party 1 refuses it at once
            assert await pair.store(4, 4, "g", fp.encode(faces[4]))
            assert await pair.decide_at(0, 4, commit=True)
            with pytest.raises(PartiesOutOfSync):
                await pair.identify("c1", "g", 4, impostor, THRESHOLD, expected_committed=4)
            assert counts() == (2, 2)
            # so the next job on that gallery is checked, and refused by the check (no MPC job sent; party 1's log is
            # compared: party 0's call of c1 may still be on its way, cancelled by the gateway after party 1's 409)
            matches_before = calls(ps[1], MATCH)
            with pytest.raises(PartiesOutOfSync):
                await pair.identify("c2", "g", 4, impostor, THRESHOLD, expected_committed=4)
            assert counts() == (3, 3)
            assert calls(ps[1], MATCH) == matches_before
            # the decision redelivered (the gateway's reconcile loop): checked once more, then skipped again
            assert await pair.decide_at(1, 4, commit=True)
            assert await pair.identify("c3", "g", 4, impostor, THRESHOLD, expected_committed=4) == 4
            assert await pair.identify("c4", "g", 4, genuine, THRESHOLD, expected_committed=4) == 1
            assert counts() == (4, 4) and pair.precheck.sent == 4

    run(scenario())


def test_always_checks_before_every_job(logged_parties):
    ps = logged_parties
    faces = unit_vectors(3, seed=12)

    async def scenario():
        async with PartyPair((ps[0].url, ps[1].url), TOKEN, 5) as pair:
            assert pair.precheck.mode == "always"
            assert await pair.store(1, 1, "g", fp.encode(faces[1]))
            assert await pair.commit(1) == (True, True)
            for j in range(3):
                assert await pair.identify(f"j{j}", "g", 1, fp.encode(faces[j]), THRESHOLD) in (None, 1)
            assert (calls(ps[0], CHECK), calls(ps[1], CHECK)) == (3, 3)

    run(scenario())


def test_an_unknown_precheck_mode_is_refused():
    with pytest.raises(ValueError, match="precheck"):
        PrecheckPolicy(cast(PrecheckMode, "sometimes"))
