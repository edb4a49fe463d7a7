"""The `privface` command: run the local stack or one of its processes, migrate, manage keys, and the client."""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.settings import GatewaySettings, get_settings

LOCAL_KEY_FILE = "local-api-key.txt"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.party is not None:
        from secure.party.db import migrate_party_db
        from secure.party.settings import PartySettings

        migrate_party_db(PartySettings(rank=args.party).database_url)
    else:
        from app.migrate import migrate_gateway

        migrate_gateway(get_settings().database_url)
    print("migrated")
    return 0


def cmd_create_api_key(args: argparse.Namespace) -> int:
    from app.auth import create_api_key, ensure_tenant
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.migrate import migrate_gateway

    settings = get_settings()
    migrate_gateway(settings.database_url)
    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        ensure_tenant(session, args.tenant, settings.default_epsilon_max)
        try:
            key = create_api_key(session, args.tenant, args.scopes, settings.secret_key)
        except ValueError as exc:
            return _fail(str(exc))
    print(key)
    return 0


def ensure_model(settings: GatewaySettings) -> str:
    """Install the bundled trained models (first start), else export model v0 when the default preset has no
    active version; returns the default preset's active version."""
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.services.bundled_models import install_bundled
    from app.services.model_registry import activate_version, active_version, register_model_dir
    from inference.export import ensure_model_v0

    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        install_bundled(session, settings.model_dir, settings.bundled_model_dir)
        row = active_version(session, settings.default_preset)
        if row is not None:
            return row.version
    if settings.default_preset != "accurate":
        raise SystemExit(f"error: no model serves the default preset {settings.default_preset!r} (no bundled model in "
                         f"{settings.bundled_model_dir}); set PRIVFACE_DEFAULT_PRESET=accurate to export the untrained v0")
    weights = settings.shared_dir / "models" / "mobilefacenet_foamliu" / "mobilefacenet.pt"
    if not weights.exists():
        raise SystemExit(f"error: no pretrained model at {weights}; set PRIVFACE_SHARED_DIR to the shared folder")
    print("exporting model v0 (first start only, about a minute) ...", flush=True)
    version_dir = ensure_model_v0(settings.model_dir, settings.shared_dir)
    with session_scope(sessions) as session:
        row = register_model_dir(session, settings.model_dir, Path(version_dir))
        activate_version(session, row.version)
        return row.version


def cmd_models(args: argparse.Namespace) -> int:
    from app.migrate import migrate_gateway

    settings = get_settings()
    migrate_gateway(settings.database_url)
    if args.action == "ensure":
        print(f"active model: {ensure_model(settings)}")
        return 0
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.models import ModelVersion
    from sqlalchemy import select

    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        for row in session.execute(select(ModelVersion).order_by(ModelVersion.created_at)).scalars():
            print(f"{row.version}\t{row.status}\t{row.transform_id}\t{row.sha256[:12]}\tthreshold={row.threshold:.4f}")
    return 0


def prepare_multiprocess_metrics() -> str:
    """Several workers share one port, so /metrics must aggregate them: point prometheus_client's
    multiprocess mode at an empty directory before the workers start (they inherit the environment).

    An operator's PROMETHEUS_MULTIPROC_DIR is used, with its old sample files (`*.db`, written by workers
    of an earlier run) removed so they are not counted again; otherwise a fresh temporary directory."""
    import tempfile

    from app.metrics import MULTIPROC_ENV

    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for old in Path(path).glob("*.db"):
            old.unlink()
    else:
        path = tempfile.mkdtemp(prefix="privface-metrics-")
        os.environ[MULTIPROC_ENV] = path
    return path


def cmd_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from app.logredact import log_config

    settings = get_settings()
    if args.host:
        settings = settings.model_copy(update={"host": args.host})
    settings.refuse_dev_secrets_off_loopback()
    own_dir = None
    if args.workers > 1:
        had_dir = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        path = prepare_multiprocess_metrics()
        own_dir = None if had_dir else path
    try:
        uvicorn.run("app.main:app", factory=True, host=settings.host, port=args.port or settings.port,
                    workers=args.workers, log_level="info", log_config=log_config())
    finally:
        if own_dir is not None:  # the temporary directory we made: gone with the gateway
            import shutil

            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


def cmd_party(args: argparse.Namespace) -> int:
    from secure.party.server import run_party
    from secure.party.settings import PartySettings

    run_party(PartySettings(rank=args.rank))
    return 0


def cmd_dealer(args: argparse.Namespace) -> int:
    from secure.mpc.sharding import run_dealers
    from secure.mpc.settings import MpcSettings

    run_dealers(MpcSettings())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.services.jobs import run_worker

    run_worker(get_settings())
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """A CA, the gateway's client certificate, the parties' and the dealer's, and the pins to configure."""
    from app.certs import make_all

    out = Path(args.out)
    try:
        issued = make_all(out, days=args.days, extra_hosts=args.host, force=args.force)
    except FileExistsError as exc:
        return _fail(str(exc))
    for item in issued.values():
        print(f"{item.role:8s} {item.cert}  sha256={item.sha256}")
    print(f"CA       {out / 'ca.pem'}  (keep {out / 'ca.key'} offline)")
    print(f"pins     {out / 'pins.env'}")
    print("parties: PRIVFACE_PARTY_SSL_CERTFILE=partyR.pem PRIVFACE_PARTY_SSL_KEYFILE=partyR.key "
          f"PRIVFACE_PARTY_SSL_CA_CERTS=ca.pem PRIVFACE_PARTY_GATEWAY_CERT_SHA256={issued['gateway'].sha256}")
    print("gateway: PRIVFACE_PARTY_CA_FILE=ca.pem PRIVFACE_PARTY_CLIENT_CERT=gateway.pem "
          "PRIVFACE_PARTY_CLIENT_KEY=gateway.key")
    return 0


def _stack_env() -> dict[str, str]:
    """The local stack's environment: a fresh token per gateway -> party link unless already configured."""
    from secure.mpc.settings import LINK_SECRETS

    env = dict(os.environ)
    for rank in (0, 1):
        env.setdefault(f"PRIVFACE_PARTY{rank}_TOKEN", secrets.token_urlsafe(24))
    for name in LINK_SECRETS:  # the MPC links' credentials (secure/mpc/link_keys.py)
        env.setdefault(name, secrets.token_urlsafe(32))
    return env


def _party_env(env: dict[str, str], rank: int) -> dict[str, str]:
    """A party's environment: its own links' credentials only, and never the gateway's master secret."""
    from secure.mpc.settings import env_for_role

    return {k: v for k, v in env_for_role(env, rank).items()
            if k not in (f"PRIVFACE_PARTY{1 - rank}_TOKEN", "PRIVFACE_SECRET_KEY")}


def _local_key(settings: GatewaySettings) -> str:
    """The local stack's API key (all scopes), created once and kept in var/ (mode 0600)."""
    from app.auth import create_api_key, ensure_tenant
    from app.db import make_engine, make_sessionmaker, session_scope

    path = settings.model_dir.parent / LOCAL_KEY_FILE
    if path.exists():
        return path.read_text().strip()
    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        ensure_tenant(session, "local", settings.default_epsilon_max)
        key = create_api_key(session, "local", ["enroll", "verify", "admin"], settings.secret_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def cmd_run(args: argparse.Namespace) -> int:
    """The whole stack on one machine: dealer, party 0, party 1 and the gateway, embedded defaults."""
    from app.migrate import migrate_gateway
    from secure.mpc.settings import DEALER, env_for_role

    settings = get_settings()
    migrate_gateway(settings.database_url)
    version = ensure_model(settings)
    key = _local_key(settings)
    python = [sys.executable, "-m", "app.cli"]
    env = _stack_env()
    without_secret = {k: v for k, v in env.items() if k != "PRIVFACE_SECRET_KEY"}
    without_tokens = {k: v for k, v in without_secret.items() if not k.endswith("_TOKEN")}
    children = [subprocess.Popen(python + ["dealer"], env=env_for_role(without_tokens, DEALER)),
                subprocess.Popen(python + ["party", "--rank", "0"], env=_party_env(env, 0)),
                subprocess.Popen(python + ["party", "--rank", "1"], env=_party_env(env, 1)),
                subprocess.Popen(python + ["gateway", "--port", str(settings.port)], env=env_for_role(env, None))]
    url = f"http://{settings.host}:{settings.port}"
    print(f"\nprivface is starting (model {version}):\n  gateway   {url}  (docs: {url}/docs, ready: {url}/readyz)\n"
          f"  party 0   {settings.party_urls[0]}\n  party 1   {settings.party_urls[1]}\n"
          f"  API key   {key}   (also in {settings.model_dir.parent / LOCAL_KEY_FILE})\n"
          f"  try: privface client --url {url} --api-key $KEY create-subject\n", flush=True)
    return _supervise(children)


def _supervise(children: list[subprocess.Popen]) -> int:
    stop = {"now": False}

    def handler(signum, frame):  # noqa: ANN001
        stop["now"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    code = 0
    while not stop["now"]:
        for child in children:
            if child.poll() is not None:
                print(f"error: a process of the stack exited ({child.args[3:]}, code {child.returncode})",
                      file=sys.stderr)
                stop["now"], code = True, 1
        time.sleep(0.5)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privface", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="the whole local stack with embedded defaults").set_defaults(func=cmd_run)
    gateway = sub.add_parser("gateway", help="the REST gateway (uvicorn)")
    gateway.add_argument("--host")
    gateway.add_argument("--port", type=int)
    gateway.add_argument("--workers", type=int, default=1)
    gateway.set_defaults(func=cmd_gateway)
    party = sub.add_parser("party", help="one MPC party server")
    party.add_argument("--rank", type=int, choices=(0, 1), required=True)
    party.set_defaults(func=cmd_party)
    sub.add_parser("dealer", help="the correlated-randomness dealer (CrypTen TTP)").set_defaults(func=cmd_dealer)
    sub.add_parser("worker", help="an rq worker for background jobs (needs PRIVFACE_REDIS_URL)").set_defaults(
        func=cmd_worker)
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--party", type=int, choices=(0, 1), help="migrate this party's database instead")
    migrate.set_defaults(func=cmd_migrate)
    key = sub.add_parser("create-api-key", help="create a tenant (if new) and an API key; prints the key once")
    key.add_argument("--tenant", required=True)
    key.add_argument("--scopes", nargs="+", required=True, help="enroll verify admin")
    key.set_defaults(func=cmd_create_api_key)
    certs = sub.add_parser("certs", help="make a CA and per-role TLS certificates, and print the pins")
    certs.add_argument("--out", default="certs", help="output folder (default ./certs)")
    certs.add_argument("--host", action="append", default=[], help="extra DNS name or IP in every certificate")
    certs.add_argument("--days", type=int, default=825)
    certs.add_argument("--force", action="store_true", help="replace an existing CA and certificates")
    certs.set_defaults(func=cmd_certs)
    models = sub.add_parser("models", help="list model versions, or make sure one is active")
    models.add_argument("action", choices=("list", "ensure"))
    models.set_defaults(func=cmd_models)
    sub.add_parser("client", help="the SDK's command line (enroll, verify, identify, delete)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        from client.cli import main as client_main

        return client_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
