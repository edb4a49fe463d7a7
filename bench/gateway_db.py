"""The gateway's database work for one verify, against the size of the gallery.

Each verify authenticates its key, loads the subject, claims the payload's nonce (the database when no Redis
is configured), looks for earlier model versions that still hold the tenant's templates, takes a settled snapshot
of the operation log (read-your-writes; the committed count the parties check), reads the subject's templates and
writes an audit row. This bench calls those same functions on a gateway database holding N enrolled subjects
(one operation and one enrollment each, half of them under an earlier model version, as after a model swap) and
reports the CPU and wall milliseconds of each step, per request. Work that grows with N is a scaling bug: a verify
must cost the same at 1,000 subjects as at 100,000.

    python -m bench.gateway_db [--sizes 1000,10000,100000] [--repeats 200] [--passes 3] [--database sqlite|postgresql]
        [--out docs/results/gateway_db.json]

The rows are bulk-inserted at the schema of revision 0004 and the newer migrations applied afterwards, so the
bench runs unchanged on a commit before them (its "before" figures) and after (migrations that summarise
existing rows do so as on a real upgrade). On PostgreSQL the tables are then analysed, as autovacuum would.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from tempfile import TemporaryDirectory
from types import SimpleNamespace
from typing import Any, cast

from alembic import command
from sqlalchemy import insert, text
from sqlalchemy.orm import Session, sessionmaker

from app.auth import Principal, authenticate, create_api_key, ensure_tenant
from app.context import GatewayContext
from app.db import make_engine, make_sessionmaker, session_scope
from app.migrate import gateway_alembic_config
from app.models import Enrollment, ModelVersion, Operation, Subject
from app.services import biometrics, operations
from app.services.audit import audit
from app.schemas import FeaturePayload
from app.services.model_registry import LoadedModel
from app.services.replay import ReplayGuard
from bench.report import emit
from common.paths import PROJECT_ROOT
from secure.coordinator import PartyPair

TENANT, SECRET, ACTIVE, EARLIER = "t-bench", "bench-master-secret", "v-new", "v-old"
PRINCIPAL = Principal(TENANT, "bench", frozenset({"verify"}), 1, None)


def fill(url: str, size: int) -> None:
    """A gateway database at revision 0004 with `size` subjects, each one committed, acknowledged store
    operation and its enrollment (every other one under the earlier model version); then upgraded to head."""
    config = gateway_alembic_config(url)
    command.upgrade(config, "0004")
    engine = make_engine(url)
    now = datetime.now(timezone.utc)
    spec = {"path": "x", "sha256": "0" * 64, "transform_id": "dct8", "params_hash": "p", "embedding_dim": 128,
            "threshold": 0.3, "metrics": {}, "preset": "accurate", "created_at": now}
    with engine.begin() as conn:
        conn.execute(insert(ModelVersion), [{**spec, "version": ACTIVE, "status": "active", "activated_at": now},
                                            {**spec, "version": EARLIER, "status": "retired", "activated_at": None}])
    with session_scope(make_sessionmaker(engine)) as session:
        ensure_tenant(session, TENANT)
    with engine.begin() as conn:
        for start in range(0, size, 20_000):
            seqs = range(start + 1, min(size, start + 20_000) + 1)
            conn.execute(insert(Subject), [{"id": f"s{i}", "tenant_id": TENANT, "created_at": now} for i in seqs])
            conn.execute(insert(Operation), [
                {"seq": i, "kind": "store", "template_seqs": [], "model_version": "g", "state": "committed",
                 "acked_0": True, "acked_1": True, "context": {}, "created_at": now, "updated_at": now} for i in seqs])
            conn.execute(insert(Enrollment), [
                {"template_seq": i, "subject_id": f"s{i}", "tenant_id": TENANT, "key_version": 1,
                 "model_version": (ACTIVE, EARLIER)[i % 2], "transform_id": "dct8", "created_at": now} for i in seqs])
    command.upgrade(config, "head")
    if engine.dialect.name == "postgresql":  # what autovacuum does to a real database after such growth
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    engine.dispose()


def steps(sessions: sessionmaker[Session], size: int) -> dict[str, Callable[[], Any]]:
    """One verify's database steps, each as the gateway runs it (subject s{size} was enrolled last)."""
    with session_scope(sessions) as session:
        key = create_api_key(session, TENANT, ["verify"], SECRET)
    guard = ReplayGuard(sessions, 300, 30, 331, None)
    loop = asyncio.new_event_loop()
    # stand-ins for what the database steps do not touch: the loaded ONNX models and the party links (every
    # operation is acknowledged, so the snapshot delivers nothing)
    spec = SimpleNamespace(transform_id="dct8", params_hash="p")
    ctx = cast(GatewayContext, SimpleNamespace(sessions=sessions, models=SimpleNamespace(
        get=lambda row: SimpleNamespace(spec=spec))))
    active = cast(LoadedModel, SimpleNamespace(version=ACTIVE, spec=spec))
    no_links = cast(PartyPair, None)
    subject = f"s{size}"

    def payload() -> FeaturePayload:
        return cast(FeaturePayload, SimpleNamespace(created_at=datetime.now(timezone.utc), nonce=uuid.uuid4().hex))

    def run_in(session_step: Callable[[Session], Any]) -> Callable[[], Any]:
        def step() -> Any:
            with session_scope(sessions) as session:
                return session_step(session)
        return step

    return {
        "authenticate": run_in(lambda s: authenticate(s, key, SECRET)),
        "load subject": run_in(lambda s: biometrics.load_subject(s, PRINCIPAL, subject)),
        "replay guard": lambda: guard.admit(payload()),
        "earlier model versions": lambda: loop.run_until_complete(biometrics.older_models(ctx, PRINCIPAL, active)),
        "settled snapshot": lambda: loop.run_until_complete(operations.settled_snapshot(sessions, no_links, 5.0)),
        "subject's templates": run_in(lambda s: biometrics.current_templates(s, subject, ACTIVE, 1, size)),
        "audit row": lambda: audit(sessions, PRINCIPAL, "verify", "match", subject, "req_bench"),
    }


def measure(step: Callable[[], Any], repeats: int, passes: int) -> dict[str, float]:
    """Milliseconds per call, the median of `passes` passes of `repeats` calls (a shared machine is noisy)."""
    step()  # warm: statement caches, connection pool
    cpu, wall = [], []
    for _ in range(passes):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            step()
        cpu.append((time.process_time() - cpu0) / repeats * 1e3)
        wall.append((time.perf_counter() - wall0) / repeats * 1e3)
    return {"cpu_ms": round(statistics.median(cpu), 3), "wall_ms": round(statistics.median(wall), 3)}


def run_size(url: str, size: int, repeats: int, passes: int) -> dict[str, Any]:
    fill(url, size)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    per_step = {name: measure(step, repeats, passes) for name, step in steps(sessions, size).items()}
    engine.dispose()
    total = {k: round(sum(s[k] for s in per_step.values()), 3) for k in ("cpu_ms", "wall_ms")}
    print(f"{size:>8} subjects: {total['cpu_ms']:7.2f} ms CPU, {total['wall_ms']:7.2f} ms wall per verify", flush=True)
    return {"subjects": size, "steps": per_step, "total": total}


ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"  # the machine's local server (trust auth)


@contextmanager
def database_url(kind: str, folder: Path, size: int) -> Iterator[str]:
    """A fresh gateway database for one size: a SQLite file in `folder`, or a PostgreSQL database dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'gateway-{size}.db'}"
        return
    import psycopg

    name = f"pf_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure_sizes(kind: str, sizes: list[int], repeats: int, passes: int) -> list[dict[str, Any]]:
    results = []
    with TemporaryDirectory(prefix="privface-gateway-db-") as folder:
        for size in sizes:
            with database_url(kind, Path(folder), size) as url:
                results.append(run_size(url, size, repeats, passes))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_db", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma list of gallery sizes")
    parser.add_argument("--repeats", type=int, default=200, help="calls timed per step, size and pass")
    parser.add_argument("--passes", type=int, default=3, help="passes per step and size; the median is reported")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be a comma list of integers, not {args.sizes!r}")
    if not sizes or min(sizes) < 1 or args.repeats < 1 or args.passes < 1:
        parser.error("--sizes, --repeats and --passes must be positive")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True).stdout.strip()
    results = measure_sizes(args.database, sizes, args.repeats, args.passes)
    report = {"bench": "gateway_db", "commit": commit, "database": args.database, "repeats": args.repeats,
              "passes": args.passes,
              "results": results}
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
