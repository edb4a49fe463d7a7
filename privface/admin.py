"""Operator commands that act on the gateway's database or make files: migrate, create-api-key, models,
certs. Each opens what it needs and exits; none serves requests."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.settings import GatewaySettings, get_settings


def fail(message: str) -> int:
    """One `error: ...` line on stderr and exit status 2 (a usage or input problem)."""
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
            return fail(str(exc))
    print(key)
    return 0


def ensure_model(settings: GatewaySettings) -> str:
    """Install the bundled trained models (first start), else export model v0 when the default preset has no
    active version; returns the default preset's active version."""
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.services.bundled_models import install_bundled
    from app.services.model_registry import activate_version, active_version, register_model_dir
    from inference.model_v0 import VERSION, ensure_model_v0, valid_version_dir

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
    if not valid_version_dir(settings.model_dir / VERSION):
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
    from sqlalchemy import select

    from app.db import make_engine, make_sessionmaker, session_scope
    from app.models import ModelVersion

    with session_scope(make_sessionmaker(make_engine(settings.database_url))) as session:
        for row in session.execute(select(ModelVersion).order_by(ModelVersion.created_at)).scalars():
            print(f"{row.version}\t{row.status}\t{row.transform_id}\t{row.sha256[:12]}\tthreshold={row.threshold:.4f}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """A CA, the gateway's client certificate, the parties' and the dealer's, and the pins to configure."""
    from app.certs import make_all

    out = Path(args.out)
    try:
        issued = make_all(out, days=args.days, extra_hosts=args.host, force=args.force)
    except FileExistsError as exc:
        return fail(str(exc))
    for item in issued.values():
        print(f"{item.role:8s} {item.cert}  sha256={item.sha256}")
    print(f"CA       {out / 'ca.pem'}  (keep {out / 'ca.key'} offline)")
    print(f"pins     {out / 'pins.env'}")
    print("parties: PRIVFACE_PARTY_SSL_CERTFILE=partyR.pem PRIVFACE_PARTY_SSL_KEYFILE=partyR.key "
          f"PRIVFACE_PARTY_SSL_CA_CERTS=ca.pem PRIVFACE_PARTY_GATEWAY_CERT_SHA256={issued['gateway'].sha256}")
    print("gateway: PRIVFACE_PARTY_CA_FILE=ca.pem PRIVFACE_PARTY_CLIENT_CERT=gateway.pem "
          "PRIVFACE_PARTY_CLIENT_KEY=gateway.key")
    return 0


def cmd_sealed_fingerprint(args: argparse.Namespace) -> int:
    """Print this party's sealed-mode key fingerprint (from PRIVFACE_PARTY_SEALED_KEY), for the operator to publish
    to integrators (PRIVFACE_SDK_SEALED_KEY_PINS); refuses when the variable is unset (a fresh key per start)."""
    import os

    from secure.sealed_box import PartyKey

    text = os.environ.get("PRIVFACE_PARTY_SEALED_KEY", "").strip()
    if not text:
        print("error: PRIVFACE_PARTY_SEALED_KEY is unset: the party would make a fresh key at each start, "
              "which no SDK can pin", file=sys.stderr)
        return 2
    try:
        print(PartyKey.from_b64(text).fingerprint)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
