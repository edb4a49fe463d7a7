"""The `deployment` engine of the `federated` job: real devices (Flower SuperNodes) behind a SuperLink.

Where the run goes is the operator's choice, never the caller's: the SuperLink's Control API address and its
TLS root certificate come from the gateway's settings (PRIVFACE_FEDERATED_SUPERLINK,
PRIVFACE_FEDERATED_SUPERLINK_ROOT_CERTIFICATES, or PRIVFACE_FEDERATED_SUPERLINK_INSECURE on loopback); a job's
params choose only rounds and options. The job then starts `training_jobs.federated.deploy_run` in
.venv-federated instead of `simulate`: same progress lines, same result line, same publish path.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.problems import Problem
from app.settings import GatewaySettings

if TYPE_CHECKING:  # federated_job imports this module
    from app.services.federated_job import FederatedParams

CONNECT_TIMEOUT_S = 3.0
DEVICES_BASE = "v0"  # the model the devices' privface ships (the Flower App starts every run from it)


def superlink_address(settings: GatewaySettings) -> tuple[str, int] | None:
    """(host, port) of the configured SuperLink, None when none is configured; ValueError when malformed."""
    text = settings.federated_superlink.strip()
    if not text:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"PRIVFACE_FEDERATED_SUPERLINK must be HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def tls_args(settings: GatewaySettings) -> list[str]:
    """How deploy_run talks to the SuperLink: TLS with the operator's root certificate, or plain text when the
    operator said so (loopback); ValueError when neither is set (no silent fallback to plain text)."""
    if settings.federated_superlink_insecure:
        return ["--insecure"]
    if settings.federated_superlink_root_certificates:
        return ["--root-certificates", str(settings.federated_superlink_root_certificates)]
    raise ValueError("engine deployment needs PRIVFACE_FEDERATED_SUPERLINK_ROOT_CERTIFICATES (TLS) or, on "
                     "loopback only, PRIVFACE_FEDERATED_SUPERLINK_INSECURE")


def check_deployment(settings: GatewaySettings, params: dict[str, Any]) -> None:
    """Before a deployment job is created: a SuperLink is configured, answers a TCP connect, and the job starts
    from the devices' model; else a problem (409 / 503) and nothing is queued."""
    try:
        address = superlink_address(settings)
        if address is not None:
            tls_args(settings)
    except ValueError as exc:
        raise Problem(409, "federated-superlink-not-configured", "No SuperLink configured",
                      f"federated: {exc}") from None
    if address is None:
        raise Problem(409, "federated-superlink-not-configured", "No SuperLink configured",
                      "federated: engine deployment needs the operator to set PRIVFACE_FEDERATED_SUPERLINK "
                      "(the SuperLink's Control API, HOST:PORT); use engine simulation, or ask the operator")
    if params.get("base_version") not in (None, DEVICES_BASE):
        raise Problem(409, "base-model-not-on-devices", "The devices do not hold this base model",
                      f"federated: engine deployment starts from the model the devices ship ({DEVICES_BASE}), not "
                      f"{params['base_version']}; set base_version {DEVICES_BASE!r}")
    try:
        socket.create_connection(address, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise Problem(503, "federated-superlink-unreachable", "The SuperLink is unreachable",
                      f"federated: the configured SuperLink {address[0]}:{address[1]} does not answer "
                      f"({type(exc).__name__}); nothing was created") from None


def deployment_command(settings: GatewaySettings, job: FederatedParams, version: str, baseline_dir: Path | None,
                       state_dir: Path) -> list[str]:
    """The deploy_run command line for this job (the same for every attempt: a resumed one follows the same run)."""
    if superlink_address(settings) is None:  # the operator removed it after the job was created
        raise ValueError("engine deployment: no SuperLink configured (PRIVFACE_FEDERATED_SUPERLINK)")
    tls = tls_args(settings)
    cmd = [str(settings.federated_python), "-m", "training_jobs.federated.deploy_run",
           "--superlink", settings.federated_superlink.strip(), *tls,
           "--rounds", str(job.rounds), "--min-nodes", str(job.clients), "--per-round", str(job.clients_per_round),
           "--scope", job.scope, "--aggregation", job.aggregation, "--seed", str(job.seed),
           "--pairs-per-fold", str(job.pairs_per_fold), "--max-images", str(job.max_images),
           "--epochs", str(job.epochs), "--state-dir", str(state_dir), "--progress",
           "--export-dir", str(settings.model_dir), "--version", version,
           "--calibration-images", str(settings.federated_calibration_images),
           *(["--calibration-faces", str(faces)] if (faces := settings.federated_calibration_faces) else [])]
    return cmd + (["--baseline-dir", str(baseline_dir)] if baseline_dir is not None else [])
