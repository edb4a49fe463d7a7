"""Two real party servers (uvicorn subprocesses, real SQLite / PostgreSQL) driven by the coordinator.

The parties run the TEST-ONLY LocalPlaintextEngine from tests/party_harness.py (no CrypTen needed).
"""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy import stats
from sqlalchemy import create_engine, text

from devtools.net import free_port
from secure import fixedpoint as fp
from secure.coordinator import PartiesError, PartiesOutOfSync, PartiesUnavailable, PartyPair
from secure.sharing import random_ring, reconstruct, to_b64

HARNESS = Path(__file__).with_name("party_harness.py")
_spec = importlib.util.spec_from_file_location("party_harness", HARNESS)
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

pytestmark = pytest.mark.slow
TOKEN = "test-internal-token-" + os.urandom(4).hex()
D = 16
THRESHOLD = 0.5


class Party:
    def __init__(self, rank: int, db_url: str, rendezvous: Path, log_dir: Path) -> None:
        self.rank, self.db_url, self.rendezvous, self.log_dir = rank, db_url, rendezvous, log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, keep_jobs: bool = False, tls_args: list[str] | None = None, tls_ctx=None) -> None:
        cmd = [sys.executable, str(HARNESS), "--rank", str(self.rank), "--db", self.db_url, "--port", str(self.port),
               "--token", TOKEN, "--rendezvous", str(self.rendezvous)] + (["--keep-jobs"] if keep_jobs else [])
        cmd += tls_args or []
        if tls_ctx is not None:
            self.url = self.url.replace("http://", "https://")
        log = open(self.log_dir / f"party{self.rank}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"party {self.rank} exited: {(self.log_dir / f'party{self.rank}.log').read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=tls_ctx or True).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"party {self.rank} did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _party_pair(backend: str, tmp_path: Path):
    dbs: list[str] = []
    urls = []
    for rank in (0, 1):
        if backend == "sqlite":
            urls.append(f"sqlite:///{tmp_path / f'party{rank}.db'}")
        else:
            if not harness.pg_available():
                pytest.fail("PostgreSQL is not reachable; run scripts/services.sh")
            name, url = harness.create_pg_database()
            dbs.append(name)
            urls.append(url)
    rendezvous = tmp_path / "rendezvous"
    ps = [Party(rank, urls[rank], rendezvous, tmp_path) for rank in (0, 1)]
    try:
        for p in ps:
            p.start()
        yield ps
    finally:
        for p in ps:
            p.stop()
        for name in dbs:
            harness.drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def parties(request, tmp_path):
    """Two parties on SQLite, then on PostgreSQL (each party its own database)."""
    yield from _party_pair(request.param, tmp_path)


@pytest.fixture
def sqlite_parties(tmp_path):
    """Two parties on SQLite only (for tests that do not exercise storage)."""
    yield from _party_pair("sqlite", tmp_path)


def pair_for(ps, timeout_s: float = 10.0) -> PartyPair:
    return PartyPair((ps[0].url, ps[1].url), TOKEN, timeout_s)


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, D))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run(coro):
    return asyncio.run(coro)


def test_store_commit_verify_identify_delete(parties):
    faces = unit_vectors(6)

    async def scenario():
        async with pair_for(parties) as pair:
            # seqs 1..4 store templates 1..4 (template_seq = op seq), 2PC with the gateway's decision
            for t in range(1, 5):
                assert await pair.store(t, t, "v1", fp.encode(faces[t]))
                assert await pair.store(t, t, "v1", fp.encode(faces[t])) is False  # a fresh split is other content: 409
                assert await pair.commit(t) == (True, True)
                assert await pair.commit(t) == (True, True)  # idempotent re-send
            # seq 5 prepared then aborted: never visible
            assert await pair.store(5, 5, "v1", fp.encode(faces[5]))
            assert await pair.abort(5) == (True, True)
            assert await pair.abort(5) == (True, True)
            assert await pair.commit(5) == (False, False)
            st = await pair.state()
            assert [s["applied_through"] for s in st] == [5, 5]
            assert [s["versions"]["v1"]["rows"] for s in st] == [4, 4]
            assert all(s["mpc"]["ready"] for s in st)

            q = fp.encode((faces[2] + 0.01) / np.linalg.norm(faces[2] + 0.01))  # unit length, as the gateway's
            assert await pair.verify("j1", "v1", 5, q, [2], THRESHOLD) is True
            assert await pair.verify("j2", "v1", 5, q, [1, 3], THRESHOLD) is False
            assert await pair.identify("j3", "v1", 5, q, THRESHOLD, expected_committed=4) == 2
            # faces[5] is most like faces[2] (0.62) among the committed rows; the gallery's threshold is fixed
            assert await pair.identify("j5", "v1", 1, q, THRESHOLD) is None  # snapshot before template 2
            assert await pair.identify("j6", "v1", 5, fp.encode(faces[5]), THRESHOLD) == 2  # the aborted row is absent

            # seq 6 deletes templates 2 and 3 in one op
            assert await pair.delete_prepare(6, [2, 3])
            assert await pair.commit(6) == (True, True)
            assert await pair.identify("j7", "v1", 6, q, THRESHOLD) is None
            assert await pair.verify("j8", "v1", 6, q, [2], THRESHOLD) is False
            with pytest.raises(PartiesOutOfSync):  # erased at once: a snapshot older than the delete is refused
                await pair.identify("j9", "v1", 5, q, THRESHOLD)
            # a store of an existing template is refused by both parties -> not prepared
            assert await pair.store(7, 1, "v1", fp.encode(faces[1])) is False
            assert await pair.abort(7) == (True, True)

    run(scenario())


def test_behind_until_the_decision_is_redelivered(sqlite_parties):
    faces = unit_vectors(4, seed=3)

    async def scenario():
        async with pair_for(sqlite_parties, timeout_s=5) as pair:
            assert await pair.store(1, 1, "v1", fp.encode(faces[1]))
            # the gateway recorded 'commit' but only party 0 got it (simulate by committing at party 0 alone)
            r = httpx.post(sqlite_parties[0].url + "/internal/ops/1/commit", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200
            with pytest.raises(PartiesOutOfSync) as exc:
                await pair.identify("b1", "v1", 1, fp.encode(faces[1]), THRESHOLD)
            assert exc.value.pending == {1: [1]}
            # the gateway re-sends its recorded decision to the party that lacks it (its reconcile loop does this)
            assert await pair.decide_at(1, 1, commit=True)
            assert await pair.decide_at(1, 1, commit=True)  # idempotent
            assert await pair.identify("b2", "v1", 1, fp.encode(faces[1]), THRESHOLD, expected_committed=1) == 1
            with pytest.raises(PartiesOutOfSync):  # gateway says 2 committed ops <= 2, the parties know 1
                await pair.identify("b3", "v1", 2, fp.encode(faces[1]), THRESHOLD, expected_committed=2)
            # an op in flight stays prepared at both until the gateway decides it
            assert await pair.store(3, 3, "v1", fp.encode(faces[3]))
            assert await pair.op_states(3) == ("prepared", "prepared")
            assert await pair.abort(3) == (True, True)
            assert await pair.identify("b4", "v1", 3, fp.encode(faces[3]), THRESHOLD) is None
            # party 1 lost a committed op (say, a restored backup): the gateway's count exposes it
            auth = {"Authorization": f"Bearer {TOKEN}"}
            body = {"seq": 4, "kind": "store", "gallery": "v1", "template_seq": 4,
                    "share": to_b64(random_ring(D))}
            assert httpx.post(sqlite_parties[0].url + "/internal/ops/prepare", headers=auth, json=body).status_code == 200
            assert httpx.post(sqlite_parties[0].url + "/internal/ops/4/commit", headers=auth).status_code == 200
            with pytest.raises(PartiesOutOfSync) as exc:
                await pair.identify("b5", "v1", 4, fp.encode(faces[3]), THRESHOLD, expected_committed=2)
            assert exc.value.pending == {1: []}
            assert exc.value.problems[1]["committed_count"] == 1
            # without the count, the precheck still sees different galleries, and no MPC job starts
            with pytest.raises(PartiesOutOfSync, match="differ"):
                await pair.identify("b6", "v1", 4, fp.encode(faces[3]), THRESHOLD)
            assert not list(sqlite_parties[0].rendezvous.glob("b6.*"))

    run(scenario())


def test_kill9_restart_rebuilds_gallery(parties, tmp_path):
    faces = unit_vectors(12, seed=5)

    async def fill():
        async with pair_for(parties) as pair:
            for t in (1, 2, 3, 4, 5, 6, 7, 8, 10):  # seq t stores template 100 + t
                assert await pair.store(t, 100 + t, "v1" if t % 3 else "v2", fp.encode(faces[t]))
                if t != 10:
                    await pair.commit(t)
            assert await pair.delete_prepare(9, [101, 104])  # seq 9 deletes two v1 templates
            await pair.commit(9)

    run(fill())
    # restart both with job capture on, then kill -9 party 1 while op 10 is still prepared
    for p in parties:
        p.stop()
        p.start(keep_jobs=True)

    async def probe(tag: str):
        async with pair_for(parties) as pair:
            out = []
            for mv, upto in (("v1", 9), ("v2", 6), ("v2", 9)):
                out.append(await pair.identify(f"{tag}-{mv}-{upto}", mv, upto, fp.encode(faces[6]), THRESHOLD))
            return out

    before = run(probe("before"))
    keep = parties[0].rendezvous / "keep"
    snap_before = {f.name.split("-", 1)[1]: np.load(f)["g"] for f in keep.glob("before-*.1.npz")}
    parties[1].kill9()
    parties[1].start(keep_jobs=True)
    after = run(probe("after"))
    snap_after = {f.name.split("-", 1)[1]: np.load(f)["g"] for f in keep.glob("after-*.1.npz")}
    assert before == after and before[1] == 106  # faces[6] is template 106 (v2)

    async def too_old():
        async with pair_for(parties) as pair:
            with pytest.raises(PartiesOutOfSync):  # party 1 erased template 101's share before loading
                await pair.identify("old", "v1", 8, fp.encode(faces[5]), THRESHOLD)

    run(too_old())
    assert snap_before.keys() == snap_after.keys() and len(snap_before) >= 2
    for k in snap_before:
        assert np.array_equal(snap_before[k], snap_after[k]), k

    async def finish():
        async with pair_for(parties) as pair:
            st = await pair.state()
            assert [s["pending"] for s in st] == [[10], [10]]  # the prepare survived kill -9
            assert await pair.commit(10) == (True, True)
            return await pair.identify("fin", "v1", 10, fp.encode(faces[10]), THRESHOLD)

    assert run(finish()) == 110


def test_no_plaintext_in_party_databases(parties):
    faces = unit_vectors(40, seed=9)
    templates = {t: fp.encode(faces[t - 1]) for t in range(1, 41)}

    async def fill():
        async with pair_for(parties) as pair:
            for t, tpl in templates.items():
                assert await pair.store(t, t, "v1", tpl)
                await pair.commit(t)

    run(fill())
    tables = []
    for p in parties:
        eng = create_engine(p.db_url)
        with eng.connect() as c:
            rows = dict(c.execute(text("SELECT template_seq, share FROM shares")).all())
            assert c.execute(text("SELECT count(*) FROM ops WHERE payload IS NOT NULL")).scalar() == 0
        eng.dispose()
        tables.append({t: np.frombuffer(bytes(b), "<i8") for t, b in rows.items()})
    for t, tpl in templates.items():
        s0, s1 = tables[0][t], tables[1][t]
        assert not np.array_equal(s0, tpl) and not np.array_equal(s1, tpl)
        assert np.array_equal(reconstruct(s0, s1), tpl)  # they are shares of it, nothing more
    for table in tables:
        raw = np.concatenate([v for v in table.values()]).astype("<i8").view(np.uint8)
        assert stats.chisquare(np.bincount(raw, minlength=256)).pvalue > 1e-6  # 5,120 bytes look uniform
        top = (raw.reshape(-1, 8)[:, 7] >> 7)  # sign bits are balanced (a plaintext template's are not)
        assert 0.35 < top.mean() < 0.65


def test_bearer_auth_and_problem_json(sqlite_parties):
    p = sqlite_parties[0]
    routes = [("POST", "/internal/ops/prepare"), ("POST", "/internal/ops/1/commit"), ("POST", "/internal/ops/1/abort"),
              ("GET", "/internal/state"), ("POST", "/internal/match"), ("GET", "/internal/ops/1")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.request(method, p.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["type"].endswith("/unauthorized")
    assert httpx.get(p.url + "/healthz").status_code == 200

    async def bad_token():
        async with PartyPair((sqlite_parties[0].url, sqlite_parties[1].url), "wrong", 5) as pair:
            with pytest.raises(PartiesUnavailable):  # a token mismatch is a deployment fault: 503, not 500
                await pair.store(1, 1, "v1", fp.encode(unit_vectors(1)[0]))
            assert await pair.commit(1) == (False, False)
            with pytest.raises(PartiesUnavailable):
                await pair.identify("x", "v1", 0, fp.encode(unit_vectors(1)[0]), THRESHOLD)

    run(bad_token())
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(p.url + "/internal/ops/prepare", headers=auth, json={"seq": 1, "kind": "store"})
    assert r.status_code == 422 and r.json()["type"].endswith("/op-invalid")
    r = httpx.post(p.url + "/internal/ops/prepare", headers=auth, json={"seq": "x", "kind": "store", "share": "AAAA"})
    assert r.status_code == 422 and "AAAA" not in r.text


def test_mpc_timeout_is_503_and_party_down_is_unavailable(sqlite_parties):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    faces = unit_vectors(2, seed=11)

    async def fill():
        async with pair_for(sqlite_parties) as pair:
            assert await pair.store(1, 1, "v1", fp.encode(faces[0]))
            await pair.commit(1)

    run(fill())

    async def wrong_dim():
        async with pair_for(sqlite_parties) as pair:
            with pytest.raises(PartiesError) as exc:  # refused by both (422), not a sync or availability issue
                await pair.identify("dim", "v1", 1, fp.encode(np.ones(D + 1) / np.sqrt(D + 1)), THRESHOLD)
            assert type(exc.value) is PartiesError and exc.value.status == 422

    run(wrong_dim())
    # only party 0 gets the job: its engine waits for a peer that never comes
    body = {"job_id": "lonely", "kind": "identify", "gallery": "v1", "upto_seq": 1,
            "query_share": to_b64(random_ring(D)), "threshold": 0.5, "timeout_s": 0.5}
    r = httpx.post(sqlite_parties[0].url + "/internal/match", headers=auth, json=body, timeout=10)
    assert r.status_code == 503 and r.json()["type"].endswith("/mpc-unavailable")
    body["query_share"] = base64.b64encode(b"\x00" * 8).decode()
    r = httpx.post(sqlite_parties[0].url + "/internal/match", headers=auth, json=body, timeout=10)
    assert r.status_code == 422

    sqlite_parties[1].kill9()

    async def down():
        async with pair_for(sqlite_parties, timeout_s=2) as pair:
            with pytest.raises(PartiesUnavailable):
                await pair.store(2, 2, "v1", fp.encode(faces[1]))
            with pytest.raises(PartiesUnavailable):
                await pair.delete_prepare(3, [1])
            assert await pair.abort(3) == (True, False)
            assert await pair.abort(2) == (True, False)
            with pytest.raises(PartiesUnavailable):
                await pair.identify("d1", "v1", 1, fp.encode(faces[0]), THRESHOLD)
            with pytest.raises(PartiesUnavailable):
                await pair.state()

    run(down())


def _openssl_cert(tmp: Path, name: str) -> tuple[str, str]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl CLI needed to make test certificates")
def test_mutual_tls_between_gateway_and_parties(tmp_path):
    import ssl

    server_cert, server_key = _openssl_cert(tmp_path, "party")
    client_cert, client_key = _openssl_cert(tmp_path, "gateway")
    ps = [Party(rank, f"sqlite:///{tmp_path / f'p{rank}.db'}", tmp_path / "rv", tmp_path) for rank in (0, 1)]
    ctx = ssl.create_default_context(cafile=server_cert)
    ctx.load_cert_chain(client_cert, client_key)
    try:
        for p in ps:
            p.start(tls_args=["--certfile", server_cert, "--keyfile", server_key, "--cafile", client_cert], tls_ctx=ctx)
        assert all(p.url.startswith("https://") for p in ps)
        face = unit_vectors(1, seed=2)[0]

        async def scenario():
            async with PartyPair((ps[0].url, ps[1].url), TOKEN, 10, tls_verify=server_cert,
                                 client_cert=(client_cert, client_key)) as pair:
                assert await pair.store(1, 1, "v1", fp.encode(face))
                assert await pair.commit(1) == (True, True)
                assert await pair.identify("tls", "v1", 1, fp.encode(face), THRESHOLD) == 1
            async with PartyPair((ps[0].url, ps[1].url), TOKEN, 3, tls_verify=server_cert) as no_client_cert:
                with pytest.raises(PartiesUnavailable):  # the parties demand a client certificate
                    await no_client_cert.state()

        run(scenario())
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(ps[0].url.replace("https://", "http://") + "/healthz", timeout=2)
    finally:
        for p in ps:
            p.stop()


def test_party_logs_hold_no_shares(sqlite_parties):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    share = random_ring(D)
    body = {"seq": 1, "kind": "store", "gallery": "v1", "template_seq": 1, "share": to_b64(share)}
    for p in sqlite_parties:
        assert httpx.post(p.url + "/internal/ops/prepare", headers=auth, json=body).status_code == 200
        assert httpx.post(p.url + "/internal/ops/1/commit", headers=auth).status_code == 200
    query = to_b64(random_ring(D))
    match = {"job_id": "logs", "kind": "identify", "gallery": "v1", "upto_seq": 1, "query_share": query,
             "threshold": 0.5, "timeout_s": 0.3}
    httpx.post(sqlite_parties[0].url + "/internal/match", headers=auth, json=match, timeout=10)
    httpx.post(sqlite_parties[0].url + "/internal/match", headers=auth, json={**match, "query_share": query[:-4]}, timeout=10)
    log_text = "".join((p.log_dir / f"party{p.rank}.log").read_text() for p in sqlite_parties)
    assert "prepared op 1" in log_text  # logging is on...
    assert to_b64(share) not in log_text and query not in log_text and query[:40] not in log_text  # ...shares are not
    assert str(int(share[0])) not in log_text


def test_identify_many_one_job_for_a_batch(sqlite_parties):
    """identify_many: Q queries in ONE match job (jobs_run +1 per party), each answered as identify would."""
    faces = unit_vectors(6, seed=11)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def jobs_run() -> list[int]:
        return [httpx.get(p.url + "/internal/state", headers=auth).json()["jobs_run"] for p in sqlite_parties]

    async def scenario():
        async with pair_for(sqlite_parties) as pair:
            assert await pair.identify_many("e0", "v1", 0, [fp.encode(faces[1])] * 3, 0.9) == [None] * 3
            for t in range(1, 5):
                assert await pair.store(t, 10 + t, "v1", fp.encode(faces[t]))
                assert await pair.commit(t) == (True, True)
            before = jobs_run()
            queries = [fp.encode(faces[2] + 0.01), fp.encode(faces[5]), fp.encode(faces[4]), fp.encode(faces[1])]
            got = await pair.identify_many("m1", "v1", 4, queries, 0.9, expected_committed=4)
            assert got == [12, None, 14, 11]
            assert jobs_run() == [b + 1 for b in before]
            singles = [await pair.identify(f"s{i}", "v1", 4, q, 0.9) for i, q in enumerate(queries)]
            assert singles == got
            assert await pair.identify_many("m2", "v1", 2, queries, 0.9) == [12, None, None, 11]  # older snapshot
            assert await pair.identify_many("m3", "v1", 4, [], 0.9) == []
            with pytest.raises(ValueError):
                await pair.identify_many("m4", "v1", 4, [queries[0]] * 65, 0.9)
            with pytest.raises(PartiesOutOfSync):  # the same error semantics as identify
                await pair.identify_many("m5", "v1", 4, queries, 0.9, expected_committed=3)

    run(scenario())

    # the party validates a batch itself: problem+json, no job run
    before = jobs_run()
    share = to_b64(random_ring(D))
    base = {"job_id": "bad", "kind": "identify", "gallery": "v1", "upto_seq": 4}
    for body in ({**base, "query_shares": [share] * 65},
                 {**base, "query_shares": []},
                 {**base, "query_shares": [share, to_b64(random_ring(D + 1))]},
                 {**base, "query_share": share, "query_shares": [share]},
                 {**base},
                 {**base, "kind": "verify", "template_seqs": [11], "query_shares": [share]}):
        r = httpx.post(sqlite_parties[0].url + "/internal/match", headers=auth, json=body)
        assert r.status_code == 422, (body.keys(), r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    assert jobs_run() == before
