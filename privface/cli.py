"""The `privface` command: run the local stack or one of its processes, migrate, manage keys, and the client.

This parser is the composition root: each subcommand is handed to the module of its role (privface/roles.py,
privface/admin.py, privface/stack.py) or, for `privface client ...`, to the SDK's own command line
(`privface client federated ...`: privface/federated.py, the device side of federated retraining).
"""
from __future__ import annotations

import argparse
import sys


def add_role_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The long-running processes: the local stack, and one role each."""
    # imported here, not at the top: `privface client federated join` runs in .venv-federated, without the
    # gateway's packages (pydantic-settings, SQLAlchemy, ...) that these modules need
    from privface.roles import cmd_dealer, cmd_gateway, cmd_party, cmd_worker
    from privface.stack import cmd_run

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


def add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The one-shot operator commands."""
    from privface.admin import cmd_certs, cmd_create_api_key, cmd_migrate, cmd_models, cmd_sealed_fingerprint

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--party", type=int, choices=(0, 1), help="migrate this party's database instead")
    migrate.set_defaults(func=cmd_migrate)
    key = sub.add_parser("create-api-key", help="create a tenant (if new) and an API key; prints the key once")
    key.add_argument("--tenant", required=True)
    key.add_argument("--scopes", nargs="+", required=True, help="enroll verify admin, or metrics alone (scrape /metrics only)")
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
    sub.add_parser("sealed-fingerprint", help="print this party's sealed key fingerprint (PRIVFACE_PARTY_SEALED_KEY), "
                   "which integrators pin").set_defaults(func=cmd_sealed_fingerprint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privface", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_role_commands(sub)
    add_admin_commands(sub)
    sub.add_parser("client", help="the SDK's command line (enroll, verify, identify, delete; federated join)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["client", "federated"]:  # a device joining federated retraining (.venv-federated)
        from privface.federated import main as federated_main

        return federated_main(argv[2:])
    if argv[:1] == ["client"]:  # the SDK parses its own arguments (and keeps its own exit codes)
        from client.cli import main as client_main

        return client_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
