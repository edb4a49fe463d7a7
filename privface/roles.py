"""The long-running roles, one process each: gateway (uvicorn), party, dealer, worker."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from app.settings import get_settings


def prepare_multiprocess_metrics() -> str:
    """Several workers share one port, so /metrics must aggregate them: point prometheus_client's
    multiprocess mode at an empty directory before the workers start (they inherit the environment).

    An operator's PROMETHEUS_MULTIPROC_DIR is used, with its old sample files (`*.db`, written by workers
    of an earlier run) removed so they are not counted again; otherwise a fresh temporary directory."""
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
    from app.metrics import MULTIPROC_ENV

    settings = get_settings()
    if args.host:
        settings = settings.model_copy(update={"host": args.host})
    settings.refuse_dev_secrets_off_loopback()
    own_dir = None
    if args.workers > 1:
        had_dir = bool(os.environ.get(MULTIPROC_ENV))
        path = prepare_multiprocess_metrics()
        own_dir = None if had_dir else path
    try:
        uvicorn.run("app.main:app", factory=True, host=settings.host, port=args.port or settings.port,
                    workers=args.workers, log_level="info", log_config=log_config(settings.log_format))
    finally:
        if own_dir is not None:  # the temporary directory we made: gone with the gateway
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


def cmd_party(args: argparse.Namespace) -> int:
    from secure.mpc.runtime.warm import start_worker_server

    start_worker_server()  # first: torch loads while the party server imports (restart time, docs/operations.md)
    from secure.party.server import run_party
    from secure.party.settings import PartySettings

    run_party(PartySettings(rank=args.rank))
    return 0


def cmd_dealer(args: argparse.Namespace) -> int:
    from common.logs import configure_logging
    from secure.mpc.runtime.warm import start_worker_server

    configure_logging()
    start_worker_server()
    from secure.mpc.settings import MpcSettings
    from secure.mpc.sharding import run_dealers

    run_dealers(MpcSettings())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.services.jobs import run_worker

    run_worker(get_settings())
    return 0
