"""Issue 9 (High + Low): one credential per gateway -> party link, the gateway's certificate pinned, thresholds
fixed per gallery at the parties (and range-checked), match jobs rate-limited and audited, parties refusing
unsafe deployments, and `privface certs` end to end.

Real processes: the parties are uvicorn subprocesses (tests/party_harness.py, TEST-ONLY plaintext engine, or
the real `privface party` command), over real sockets and SQLite files.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from devtools.net import free_port
from secure import fixedpoint as fp
from secure.coordinator import PartiesError, PartyPair
from secure.pacing import JobPacer
from secure.sharing import split, to_b64

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("party_harness.py")
_spec = importlib.util.spec_from_file_location("party_harness", HARNESS)
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

D = 16
TOKENS = ("link0-" + os.urandom(8).hex(), "link1-" + os.urandom(8).hex())


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, D))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, verify=True, timeout: float = 60) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"party exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"party at {url} did not start: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_harness(tmp: Path, rank: int, *extra: str, tls_verify=True) -> tuple[subprocess.Popen, str, str]:  # noqa: ANN001
    """A harness party with this link's own token; returns (process, url, sqlite url)."""
    port = free_port()
    db = f"sqlite:///{tmp / f'party{rank}.db'}"
    log = tmp / f"party{rank}.log"
    cmd = [sys.executable, str(HARNESS), "--rank", str(rank), "--db", db, "--port", str(port),
           "--token", TOKENS[rank], "--rendezvous", str(tmp / "rv"), *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    scheme = "https" if "--certfile" in extra else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    _wait_healthy(proc, url, log, verify=tls_verify)
    return proc, url, db


def _pair(tmp: Path):  # noqa: ANN202
    procs = [start_harness(tmp, rank, "--match-rate", "1000", "--match-burst", "1000") for rank in (0, 1)]
    yield procs
    for proc, _, _ in procs:
        _stop(proc)


@pytest.fixture
def pair_procs(tmp_path):
    yield from _pair(tmp_path)


@pytest.fixture(scope="module")
def module_pair_procs(tmp_path_factory):
    """One pair for tests that only ask and never change what another test sees (each its own gallery name)."""
    yield from _pair(tmp_path_factory.mktemp("pair"))


# -- 1. one credential per link ---------------------------------------------------------------------------
def _party_env(tmp: Path, rank: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVFACE_")}
    env.update({"PRIVFACE_ENV": "test", "PRIVFACE_PARTY_RANK": str(rank),
                "PRIVFACE_PARTY_DATABASE_URL": f"sqlite:///{tmp / f'real{rank}.db'}",
                "PRIVFACE_MPC_PROVIDER": "TTP", "PRIVFACE_MPC_MASTER_ADDR": "127.0.0.1",
                "PRIVFACE_MPC_MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


def test_party1_token_refused_at_party0(tmp_path):
    """The real `privface party` reads its own link's token: party 1's (or the old shared one) is refused."""
    port = free_port()
    env = _party_env(tmp_path, 0, PRIVFACE_PARTY0_TOKEN=TOKENS[0], PRIVFACE_PARTY1_TOKEN=TOKENS[1],
                     PRIVFACE_INTERNAL_TOKEN=TOKENS[1], PRIVFACE_PARTY_PORT=str(port))
    log = tmp_path / "real0.log"
    proc = subprocess.Popen([sys.executable, "-m", "privface", "party", "--rank", "0"], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log, timeout=120)
        own = httpx.get(url + "/internal/state", headers={"Authorization": f"Bearer {TOKENS[0]}"}, timeout=10)
        assert own.status_code == 200, own.text
        for other in (TOKENS[1], "dev-internal-token", "dev-party0-token"):
            r = httpx.get(url + "/internal/state", headers={"Authorization": f"Bearer {other}"}, timeout=10)
            assert r.status_code == 401 and r.json()["type"].endswith("/unauthorized")
            assert r.headers["content-type"].startswith("application/problem+json")
    finally:
        _stop(proc)


def test_gateway_holds_one_token_per_party(pair_procs):
    """PartyPair sends each party its own token; one token for both links is refused by the other party."""
    (_, u0, _), (_, u1, _) = pair_procs
    face = unit_vectors(1, seed=3)[0]

    async def scenario():
        async with PartyPair((u0, u1), TOKENS, 10) as pair:
            assert await pair.store(1, 1, "g", fp.encode(face))
            assert await pair.commit(1) == (True, True)
            assert await pair.identify("ok", "g", 1, fp.encode(face), 0.5) == 1
        for token in TOKENS:  # a single token (the old shared design) opens one link only
            async with PartyPair((u0, u1), token, 5) as pair:
                states = [await pair.decide_at(rank, 1, True) for rank in (0, 1)]
                assert states == [token == TOKENS[0], token == TOKENS[1]]

    asyncio.run(scenario())


# -- 2. thresholds fixed at the parties, range checks ---------------------------------------------------------
def _raw_match_both(urls: list[str], body: dict, query: np.ndarray) -> list[httpx.Response]:
    """What a holder of both tokens could send: the same job at both parties with a chosen threshold."""
    q0, q1 = split(fp.encode(query))

    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(
                client.post(url + "/internal/match", json={**body, "query_share": to_b64(q)},
                            headers={"Authorization": f"Bearer {TOKENS[rank]}"})
                for rank, (url, q) in enumerate(zip(urls, (q0, q1)))))

    return asyncio.run(go())


def test_chosen_threshold_cannot_change_the_outcome(pair_procs):
    """Regression: a verify job with a threshold below the gallery's would reveal a match the gallery's refuses."""
    (_, u0, _), (_, u1, _) = pair_procs
    faces = unit_vectors(2, seed=5)
    template, probe = faces[0], faces[1]
    assert float(template @ probe) < 0.5  # no match at the gallery's threshold

    async def setup():
        async with PartyPair((u0, u1), TOKENS, 10) as pair:
            assert await pair.store(1, 1, "g", fp.encode(template))
            assert await pair.commit(1) == (True, True)
            assert await pair.verify("v0", "g", 1, fp.encode(probe), [1], 0.5) is False  # registers g at 0.5
            with pytest.raises(PartiesError) as exc:  # re-registering the gallery at another threshold
                await PartyPair((u0, u1), TOKENS, 10).register_gallery("g", -1.0)
            assert exc.value.status == 409

    asyncio.run(setup())
    body = {"job_id": "probe", "kind": "verify", "gallery": "g", "upto_seq": 1, "template_seqs": [1],
            "threshold": -1.0}
    for r in _raw_match_both([u0, u1], body, probe):
        assert r.status_code == 409 and r.json()["type"].endswith("/threshold-mismatch"), r.text
    # without a threshold the job runs at the gallery's own: still no match
    body = {**body, "job_id": "probe2"}
    del body["threshold"]
    r0, r1 = _raw_match_both([u0, u1], body, probe)
    assert r0.status_code == r1.status_code == 200
    assert (int(r0.json()["share"]) + int(r1.json()["share"])) % (1 << 64) == 0
    # an unregistered gallery cannot be matched on
    r = _raw_match_both([u0, u1], {**body, "job_id": "u", "gallery": "other"}, probe)[0]
    assert r.status_code == 409 and r.json()["type"].endswith("/gallery-unregistered")


def test_identify_threshold_follows_the_gallery_size_at_the_party(pair_procs):
    """The identify schedule registered with a gallery is applied by the party from its own row count: the same
    probe matches a gallery of 2 rows (threshold 0.0) and not the same gallery grown to 3 rows (0.99)."""
    from secure.thresholds import GalleryPolicy

    (_, u0, _), (_, u1, _) = pair_procs
    faces = unit_vectors(4, seed=9)
    probe = faces[3]
    policy = GalleryPolicy(0.5, ((2, -1.0), (1000, 0.99)))

    async def run():
        async with PartyPair((u0, u1), TOKENS, 10) as pair:
            for seq in (1, 2):
                assert await pair.store(seq, seq, "sched", fp.encode(faces[seq - 1]))
                assert await pair.commit(seq) == (True, True)
            small = await pair.identify("i1", "sched", 2, fp.encode(probe), policy)
            assert await pair.store(3, 3, "sched", fp.encode(faces[2]))
            assert await pair.commit(3) == (True, True)
            large = await pair.identify("i2", "sched", 3, fp.encode(probe), policy)
            with pytest.raises(PartiesError) as exc:  # the schedule is fixed with the gallery
                await PartyPair((u0, u1), TOKENS, 10).register_gallery("sched", GalleryPolicy(0.5, ((2, 0.9),)))
            return small, large, exc.value.status

    small, large, status = asyncio.run(run())
    assert small in (1, 2) and large is None and status == 409


@pytest.mark.parametrize("threshold,ok", [(1.0, True), (-1.0, True), (0.999999, True), (1.0000001, False),
                                          (-1.0000001, False), (31.0, False), (40.0, False),
                                          (float("inf"), False), (float("nan"), False)])
def test_party_refuses_out_of_range_thresholds(module_pair_procs, threshold, ok):
    (_, u0, _), _ = module_pair_procs
    body = json.dumps({"gallery": f"g{threshold}", "threshold": threshold})  # NaN/Infinity as Python writes
    r = httpx.post(u0 + "/internal/galleries", content=body,
                   headers={"Authorization": f"Bearer {TOKENS[0]}", "Content-Type": "application/json"})
    assert (r.status_code == 200) is ok, r.text
    if not ok:
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize("threshold", [40.0, 31.0, 1.0000001, -1.5, float("nan"), float("inf"), -float("inf")])
def test_engine_refuses_out_of_range_thresholds(threshold):
    """Regression (T = 40 wraps in the 2^38 comparison: label 22 where plaintext gives 0): refused at entry."""
    from secure.mpc.engine import MatchJob, _validate

    job = MatchJob(job_id="j", kind="identify", query_share=np.zeros(4, np.int64),
                   gallery_share=np.zeros((2, 4), np.int64), labels=np.array([1, 2], np.int64), threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        _validate(job)
    merge = MatchJob(job_id="m", kind="merge", query_share=np.zeros(1, np.int64),
                     gallery_share=np.zeros((2, 2), np.int64), labels=np.array([1, 2], np.int64), threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        _validate(merge)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.35, 1.0])
def test_engine_accepts_the_edges(threshold):
    from secure.mpc.engine import MatchJob, _validate

    job = MatchJob(job_id="j", kind="verify", query_share=np.zeros(4, np.int64),
                   gallery_share=np.zeros((1, 4), np.int64), labels=np.array([1], np.int64), threshold=threshold)
    _validate(job)


def test_vectors_must_stay_within_a_unit_vectors_fixed_point_range():
    """A scaled query would turn the fixed threshold into a chosen one: the gateway refuses it before splitting."""
    from secure.ranges import check_unit_fixed

    e = np.zeros(D)
    e[3] = 1.0
    check_unit_fixed(fp.encode(e))
    check_unit_fixed(fp.encode(unit_vectors(4)))
    check_unit_fixed(fp.encode(unit_vectors(1)[0] * 1.0005))  # rounding slack
    for bad in (e * 2, e * 1.01, unit_vectors(1)[0] * 1.002, np.full(D, 0.3)):
        with pytest.raises(ValueError):
            check_unit_fixed(fp.encode(bad))

    async def scaled():
        pair = PartyPair(("http://127.0.0.1:9", "http://127.0.0.1:9"), TOKENS, 1)
        try:
            with pytest.raises(ValueError):  # refused before any party is contacted
                await pair.verify("s", "g", 1, fp.encode(e * 40), [1], 0.5)
            with pytest.raises(ValueError):
                await pair.store(1, 1, "g", fp.encode(e * 3))
            with pytest.raises(ValueError):
                await pair.register_gallery("g", 40.0)
        finally:
            await pair.aclose()

    asyncio.run(scaled())


# -- 3. rate limit and audit -----------------------------------------------------------------------------------
def test_match_jobs_are_rate_limited_and_audited(tmp_path):
    procs = [start_harness(tmp_path, rank, "--match-rate", "0.2", "--match-burst", "3") for rank in (0, 1)]
    (_, u0, db0), (_, u1, _) = procs
    faces = unit_vectors(3, seed=9)
    try:
        async def scenario():
            async with PartyPair((u0, u1), TOKENS, 10) as pair:
                for t in (1, 2):
                    assert await pair.store(t, t, "g", fp.encode(faces[t]))
                    assert await pair.commit(t) == (True, True)
                for i in range(3):  # the burst
                    assert await pair.identify(f"a{i}", "g", 2, fp.encode(faces[1]), 0.5) == 1
                with pytest.raises(PartiesError) as exc:
                    await pair.identify("over", "g", 2, fp.encode(faces[1]), 0.5)
                assert exc.value.status == 429

        asyncio.run(scenario())
        body = {"job_id": "raw", "kind": "identify", "gallery": "g", "upto_seq": 2,
                "query_share": to_b64(np.zeros(D, np.int64))}
        r = httpx.post(u0 + "/internal/match", json=body, headers={"Authorization": f"Bearer {TOKENS[0]}"})
        assert r.status_code == 429 and r.json()["type"].endswith("/rate-limited")
        assert int(r.headers["retry-after"]) >= 1
        engine = create_engine(db0)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT job_id, kind, model_version, rows, queries, status FROM match_audit "
                                     "ORDER BY id")).all()
            columns = [c[1] for c in conn.execute(text("PRAGMA table_info(match_audit)")).all()]
        engine.dispose()
        assert [tuple(r) for r in rows[:3]] == [(f"a{i}", "identify", "g", 2, 1, 200) for i in range(3)]
        assert [(r[0], r[5]) for r in rows[3:]] == [("over", 429), ("raw", 429)]
        assert set(columns) == {"id", "at", "job_id", "kind", "model_version", "rows", "queries", "status"}
        log = (tmp_path / "party0.log").read_text()
        assert "match job party=0 job=a0 kind=identify gallery=g rows=2 queries=1 status=200" in log
    finally:
        for proc, _, _ in procs:
            _stop(proc)


def test_a_paced_gateway_stays_within_the_party_budget_where_an_unpaced_one_is_refused(tmp_path):
    """The gateway's pacer (secure/pacing.py) holds jobs back instead of letting the party refuse them: six
    concurrent identifies against a budget of 2 jobs/s (burst 2) all succeed when paced just under it; the same
    six unpaced, once the budget has refilled, are partly refused (429). As the defaults do, the pacer's burst is
    below the party's: the spare token absorbs jitter between release and arrival (with equal bursts a loaded CI
    machine once delivered two paced jobs close enough together to be refused)."""
    procs = [start_harness(tmp_path, rank, "--match-rate", "2", "--match-burst", "2") for rank in (0, 1)]
    (_, u0, _), (_, u1, _) = procs
    faces = unit_vectors(3, seed=4)
    try:
        async def identify_six(pair: PartyPair, tag: str) -> list[object]:
            return await asyncio.gather(*(pair.identify(f"{tag}{i}", "g", 2, fp.encode(faces[1]), 0.5)
                                          for i in range(6)), return_exceptions=True)

        async def scenario() -> tuple[list[object], list[object], float]:
            pacer = JobPacer(concurrency=8, rate_per_s=1.8, burst=1, max_wait_s=10)
            async with PartyPair((u0, u1), TOKENS, 10, pacer=pacer) as paced, PartyPair((u0, u1), TOKENS, 10) as raw:
                for t in (1, 2):
                    assert await paced.store(t, t, "g", fp.encode(faces[t]))
                    assert await paced.commit(t) == (True, True)
                started = time.monotonic()
                paced_results = await identify_six(paced, "p")
                paced_s = time.monotonic() - started
                await asyncio.sleep(1.5)  # the party's bucket refills its burst
                return paced_results, await identify_six(raw, "r"), paced_s

        paced_results, raw_results, paced_s = asyncio.run(scenario())
        assert paced_results == [1] * 6
        assert paced_s >= 5 / 1.8 - 0.2  # held back at the gateway: one at once, then one per 1/1.8 s
        refused = [r for r in raw_results if isinstance(r, PartiesError)]
        assert refused and all(r.status == 429 for r in refused)  # each party spends its own budget
    finally:
        for proc, _, _ in procs:
            _stop(proc)


# -- refusing unsafe deployments -----------------------------------------------------------------------------
def test_party_refuses_plain_http_off_loopback(tmp_path):
    """Regression: a party on 0.0.0.0 with a real token but no TLS used to serve plain HTTP (a warning only)."""
    env = _party_env(tmp_path, 0, PRIVFACE_PARTY0_TOKEN="t" * 40, PRIVFACE_INTERNAL_TOKEN="t" * 40,
                     PRIVFACE_PARTY_HOST="0.0.0.0",
                     PRIVFACE_PARTY_PORT=str(free_port()))
    try:
        done = subprocess.run([sys.executable, "-m", "privface", "party", "--rank", "0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the party served plain HTTP off loopback instead of refusing to start")
    assert done.returncode != 0
    assert "plain HTTP is refused off loopback" in done.stderr + done.stdout
    assert not (tmp_path / "real0.db").exists()  # refused before touching its database


def test_deployment_checks():
    from secure.party.deployment import deployment_problems
    from secure.party.settings import PartySettings

    pin = "ab" * 32
    safe = PartySettings(rank=1, host="0.0.0.0", internal_token="x" * 40, ssl_certfile="c", ssl_keyfile="k",
                         ssl_ca_certs="ca", gateway_cert_sha256=pin)
    assert deployment_problems(safe) == []
    for change, words in ((dict(internal_token="dev-party1-token"), "development token"),
                          (dict(ssl_certfile=None), "plain HTTP"), (dict(ssl_ca_certs=None), "mutual TLS"),
                          (dict(gateway_cert_sha256=None), "pinned"), (dict(gateway_cert_sha256="zz"), "64-hex")):
        problems = deployment_problems(safe.model_copy(update=change))
        assert any(words in p for p in problems), (change, problems)
    assert deployment_problems(PartySettings(rank=0)) == []  # loopback dev defaults still start
    assert deployment_problems(PartySettings(rank=0, host="127.0.0.2")) == []


def test_gateway_refuses_one_token_for_both_links():
    from app.settings import GatewaySettings

    s = GatewaySettings(host="0.0.0.0", secret_key="s" * 32, party0_token="a" * 32, party1_token="a" * 32)
    with pytest.raises(SystemExit, match="must differ"):
        s.refuse_dev_secrets_off_loopback()
    with pytest.raises(SystemExit, match="PRIVFACE_PARTY1_TOKEN"):
        s.model_copy(update={"party1_token": "dev-party1-token"}).refuse_dev_secrets_off_loopback()
    s.model_copy(update={"party1_token": "b" * 32}).refuse_dev_secrets_off_loopback()


# -- 4. privface certs, end to end ------------------------------------------------------------------------------
def test_certs_command_then_pinned_mtls_party(tmp_path):
    """`privface certs` -> a party with TLS + mTLS + the gateway pin: the gateway's certificate is served,
    another certificate of the same CA (the dealer's, party 1's) is refused."""
    out = tmp_path / "certs"
    done = subprocess.run([sys.executable, "-m", "privface", "certs", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    pins = dict(line.split("=", 1) for line in (out / "pins.env").read_text().splitlines()
                if line and not line.startswith("#"))
    pin = pins["PRIVFACE_PARTY_GATEWAY_CERT_SHA256"]
    creds = dict(line.split("=", 1) for line in (out / "secrets.env").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert len(set(creds.values())) == 6 and all(len(v) >= 32 for v in creds.values())  # one per link
    assert (out / "secrets.env").stat().st_mode & 0o077 == 0  # readable by its owner only
    ca = str(out / "ca.pem")
    server = ssl.create_default_context(cafile=ca)
    as_gateway = ssl.create_default_context(cafile=ca)
    as_gateway.load_cert_chain(str(out / "gateway.pem"), str(out / "gateway.key"))
    proc, url, _ = start_harness(tmp_path, 0, "--certfile", str(out / "party0.pem"), "--keyfile",
                                 str(out / "party0.key"), "--cafile", ca, "--pin", pin, tls_verify=as_gateway)
    try:
        def call(role: str) -> httpx.Response:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.load_cert_chain(str(out / f"{role}.pem"), str(out / f"{role}.key"))
            return httpx.get(url + "/internal/state", headers={"Authorization": f"Bearer {TOKENS[0]}"},
                             verify=ctx, timeout=10)

        assert call("gateway").status_code == 200
        for role in ("dealer", "party1"):
            r = call(role)
            assert r.status_code == 403 and r.json()["type"].endswith("/client-not-pinned"), role
        with pytest.raises(httpx.HTTPError):  # no client certificate at all: the TLS handshake fails
            httpx.get(url + "/internal/state", verify=server, timeout=5)

        async def gateway():
            async with PartyPair((url, url), TOKENS[0], 10, tls_verify=ca,
                                 client_cert=(str(out / "gateway.pem"), str(out / "gateway.key"))) as pair:
                return (await pair.state())[0]["rank"]

        assert asyncio.run(gateway()) == 0
    finally:
        _stop(proc)
