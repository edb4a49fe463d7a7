"""`privface run`: the whole stack on one machine (dealer, party 0, party 1, gateway) with embedded
defaults, each role its own `python -m privface` process holding only its own credentials."""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from types import FrameType

from app.settings import GatewaySettings, get_settings
from privface.admin import ensure_model

LOCAL_KEY_FILE = "local-api-key.txt"
ROLE_COMMAND = [sys.executable, "-m", "privface"]


def stack_env() -> dict[str, str]:
    """The local stack's environment: a fresh token per gateway -> party link unless already configured."""
    from secure.mpc.settings import LINK_SECRETS

    env = dict(os.environ)
    for rank in (0, 1):
        env.setdefault(f"PRIVFACE_PARTY{rank}_TOKEN", secrets.token_urlsafe(24))
    for name in LINK_SECRETS:  # the MPC links' credentials (secure/mpc/runtime/link_keys.py)
        env.setdefault(name, secrets.token_urlsafe(32))
    return env


def party_env(env: dict[str, str], rank: int) -> dict[str, str]:
    """A party's environment: its own links' credentials only, and never the gateway's master secret."""
    from secure.mpc.settings import env_for_role

    return {k: v for k, v in env_for_role(env, rank).items()
            if k not in (f"PRIVFACE_PARTY{1 - rank}_TOKEN", "PRIVFACE_SECRET_KEY")}


def dealer_env(env: dict[str, str]) -> dict[str, str]:
    """The dealer's environment: its two MPC links' credentials, no party token, no master secret."""
    from secure.mpc.settings import DEALER, env_for_role

    kept = {k: v for k, v in env.items() if k != "PRIVFACE_SECRET_KEY" and not k.endswith("_TOKEN")}
    return env_for_role(kept, DEALER)


def local_key(settings: GatewaySettings) -> str:
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


Children = dict[str, "subprocess.Popen[bytes]"]  # role arguments ("party --rank 0") -> its process


def start_roles(settings: GatewaySettings, sealed_keys: tuple[str, str]) -> Children:
    """One process per role, each with only the environment its role may hold (a party: its own sealed key)."""
    from secure.mpc.settings import env_for_role

    env = stack_env()
    parties = {f"party --rank {rank}": {**party_env(env, rank), "PRIVFACE_PARTY_SEALED_KEY": sealed_keys[rank]}
               for rank in (0, 1)}
    roles = {"dealer": dealer_env(env), **parties, f"gateway --port {settings.port}": env_for_role(env, None)}
    return {role: subprocess.Popen(ROLE_COMMAND + role.split(), env=role_env) for role, role_env in roles.items()}


def cmd_run(args: argparse.Namespace) -> int:
    """The whole stack on one machine: dealer, party 0, party 1 and the gateway, embedded defaults."""
    from app.migrate import migrate_gateway

    settings = get_settings()
    migrate_gateway(settings.database_url)
    version = ensure_model(settings)
    key = local_key(settings)
    from secure.sealed_box import PartyKey

    sealed = (PartyKey.generate(), PartyKey.generate())  # fresh per run: pins printed below for the SDK
    children = start_roles(settings, (sealed[0].private_b64(), sealed[1].private_b64()))
    url = f"http://{settings.host}:{settings.port}"
    print(f"\nprivface is starting (model {version}):\n  gateway   {url}  (docs: {url}/docs, ready: {url}/readyz)\n"
          f"  party 0   {settings.party_urls[0]}\n  party 1   {settings.party_urls[1]}\n"
          f"  API key   {key}   (also in {settings.model_dir.parent / LOCAL_KEY_FILE})\n"
          f"  sealed    PRIVFACE_SDK_SEALED_KEY_PINS={sealed[0].fingerprint},{sealed[1].fingerprint}\n"
          f"  try: privface client --url {url} --api-key $KEY create-subject\n", flush=True)
    return supervise(children)


def supervise(children: Children) -> int:
    """Wait until a signal or until any child exits (then exit 1); stop the others either way."""
    stop = {"now": False}

    def handler(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    code = 0
    while not stop["now"]:
        for role, child in children.items():
            if child.poll() is not None:
                print(f"error: a process of the stack exited ({role}, code {child.returncode})", file=sys.stderr)
                stop["now"], code = True, 1
        time.sleep(0.5)
    terminate(list(children.values()))
    return code


def terminate(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child still running, then SIGKILL whichever has not exited 10 s later."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
