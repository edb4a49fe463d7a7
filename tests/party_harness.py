"""TEST-ONLY party launcher with a plaintext stand-in for the MPC engine. Never used by production code.

``LocalPlaintextEngine`` rendezvous-es the two party processes through a shared folder: each writes its
shares of a job there and reads the other's, reconstructs in the clear, and returns an additive share of the
output. It exists so the party/coordinator tests can run without CrypTen; it protects nothing.

Run: python tests/party_harness.py --rank R --db URL --port P --token T --rendezvous DIR
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from secure.mpc.engine import MatchJob

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _mpc_engine_module() -> types.ModuleType:
    """secure.mpc.engine when it exists; otherwise a minimal test stand-in with the same two types."""
    try:
        import secure.mpc.engine as mod  # noqa: F401

        return mod
    except ModuleNotFoundError as exc:  # only while secure/mpc/ does not exist yet; a broken one must fail
        if exc.name not in ("secure.mpc", "secure.mpc.engine"):
            raise
        mod = types.ModuleType("secure.mpc.engine")

        @dataclass(frozen=True)
        class MatchJob:
            job_id: str
            kind: Literal["verify", "identify"]
            query_share: np.ndarray
            gallery_share: np.ndarray
            labels: np.ndarray
            threshold: float

        class MpcUnavailable(Exception):
            pass

        mod.MatchJob, mod.MpcUnavailable = MatchJob, MpcUnavailable
        pkg = types.ModuleType("secure.mpc")
        pkg.engine = mod
        sys.modules.setdefault("secure.mpc", pkg)
        sys.modules["secure.mpc.engine"] = mod
        return mod


class LocalPlaintextEngine:
    """TEST ONLY: reconstructs both parties' shares in the clear via a shared folder."""

    def __init__(self, rank: int, rendezvous: Path, keep: bool = False) -> None:
        self.rank, self.dir, self.keep = rank, Path(rendezvous), keep
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict:
        return {"engine": "local-plaintext-TEST-ONLY", "ready": True, "rank": self.rank, "jobs": self.jobs}

    def submit(self, job: MatchJob, timeout: float) -> int:
        from secure.fixedpoint import decode
        from secure.sharing import reconstruct

        unavailable = _mpc_engine_module().MpcUnavailable
        mine = self.dir / f"{job.job_id}.{self.rank}.npz"
        theirs = self.dir / f"{job.job_id}.{1 - self.rank}.npz"
        tmp = self.dir / f".{job.job_id}.{self.rank}.tmp.npz"
        np.savez(tmp, q=job.query_share, g=job.gallery_share, l=job.labels, t=np.float64(job.threshold))
        if self.keep:
            keep = self.dir / "keep"
            keep.mkdir(exist_ok=True)
            np.savez(keep / f"{job.job_id}.{self.rank}.npz", g=job.gallery_share, l=job.labels)
        os.replace(tmp, mine)
        deadline = time.monotonic() + timeout
        while not theirs.exists():
            if time.monotonic() > deadline:
                mine.unlink(missing_ok=True)
                raise unavailable("peer did not join")
            time.sleep(0.01)
        for _ in range(100):
            try:
                with np.load(theirs) as z:
                    q, g, lab = z["q"], z["g"], z["l"]
                break
            except (OSError, ValueError, EOFError):
                time.sleep(0.01)
        else:
            raise unavailable("peer file unreadable")
        theirs.unlink(missing_ok=True)
        if not np.array_equal(lab, job.labels):
            raise RuntimeError("parties disagree on the gallery")
        query = decode(reconstruct(job.query_share, q))
        gallery = decode(reconstruct(job.gallery_share, g))
        outs = []
        for i, one in enumerate(np.atleast_2d(query)):  # identify may carry a batch [Q, d]: one output each
            scores = gallery @ one
            best = int(np.argmax(scores))
            hit = bool(scores[best] >= job.threshold)
            out = (1 if hit else 0) if job.kind == "verify" else (int(job.labels[best]) if hit else 0)
            mask = int.from_bytes(hashlib.sha256(f"{job.job_id}/{i}".encode()).digest()[:8], "little")
            outs.append((out - mask) % (1 << 64) if self.rank == 0 else mask)
        self.jobs += 1
        return outs if query.ndim == 2 else outs[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--rendezvous", required=True)
    ap.add_argument("--keep-jobs", action="store_true")
    ap.add_argument("--certfile")
    ap.add_argument("--keyfile")
    ap.add_argument("--cafile")
    ap.add_argument("--pin", help="SHA-256 of the gateway's client certificate (needs --cafile)")
    ap.add_argument("--match-rate", type=float, default=1000.0)
    ap.add_argument("--match-burst", type=int, default=1000)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    _mpc_engine_module()
    import uvicorn

    from secure.party.db import migrate_party_db
    from secure.party.deployment import uvicorn_options
    from secure.party.server import create_party_app
    from secure.party.settings import PartySettings

    settings = PartySettings(rank=args.rank, database_url=args.db, internal_token=args.token, port=args.port,
                             match_timeout_s=20, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                             ssl_ca_certs=args.cafile, gateway_cert_sha256=args.pin,
                             match_rate_per_s=args.match_rate, match_burst=args.match_burst)
    migrate_party_db(args.db)
    engine = LocalPlaintextEngine(args.rank, Path(args.rendezvous), keep=args.keep_jobs)
    app = create_party_app(settings, engine)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info", timeout_graceful_shutdown=1,
                **uvicorn_options(settings))  # the real party's keep-alive and TLS


if __name__ == "__main__":
    main()


# -- helpers for the tests (loaded by path, see load_harness in the test modules) -----------------------------
PG_ADMIN_URL = os.environ.get("PRIVFACE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001
        return False


def create_pg_database(prefix: str = "privface_party") -> tuple[str, str]:
    """A fresh, uniquely named PostgreSQL database: (name, SQLAlchemy URL)."""
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
