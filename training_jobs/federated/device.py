"""A device joins federated retraining: a Flower SuperNode that runs privface's ClientApp on its owner's faces.

`privface client federated join` (privface/federated.py) aligns the owner's photos with the SDK's detector
and hands the faces here. They are written to a private temporary folder (mode 0700) that only this device's
SuperNode and its ClientApp process read (node config `faces`, deploy.py), and removed when the SuperNode
exits. Nothing but the model update, the class vector, the FedAvg weight (photos, capped) and the losses
leaves the device (docs/federated.md).

Needs Flower (flwr 1.41), which is only in .venv-federated; without it `require_flower` says so in one line.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FACES_FILE = "faces.npy"
CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # devices call no one else


class DeviceError(ValueError):
    """A bad join request (no Flower, bad address, bad faces): one line for the user, nothing started."""


def require_flower() -> None:
    """Refuse in one line when Flower is not importable here (the gateway venv has none)."""
    if importlib.util.find_spec("flwr") is None:
        raise DeviceError("federated join needs Flower (flwr 1.41), which is only in .venv-federated: run "
                          "`make install-federated`, then `.venv-federated/bin/privface client federated join ...`")


@dataclass(frozen=True)
class JoinOptions:
    """How this device reaches the SuperLink. Without `insecure`, TLS is used (the SuperLink's CA in
    `root_certificates`, or the system's); `auth_key` is the device's EC private key (OpenSSH format) when the
    SuperLink authenticates SuperNodes."""

    superlink: str
    insecure: bool = False
    root_certificates: Path | None = None
    auth_key: Path | None = None
    client_id: str | None = None
    runtime_port: int = 9094  # the SuperNode's local API (127.0.0.1), one per SuperNode on a machine
    max_wait_time: float | None = None  # stop retrying to reach the SuperLink after this many seconds

    def check(self) -> None:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in self.superlink:
            raise DeviceError(f"--superlink must be HOST:PORT (no URL prefix), not {self.superlink!r}")
        if self.client_id is not None and not CLIENT_ID.match(self.client_id):
            raise DeviceError("--client-id must be 1-64 letters, digits, '_', '.' or '-'")
        if self.insecure and self.root_certificates is not None:
            raise DeviceError("--insecure and --root-certificates exclude each other")
        for path in (self.root_certificates, self.auth_key):
            if path is not None and not path.is_file():
                raise DeviceError(f"{path}: no such file")


def flower_executable(name: str) -> str:
    """A Flower command from the environment of this Python (so the SuperNode runs privface's own venv)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DeviceError(f"{name} not found beside {sys.executable}: is flwr installed in this environment?")
    return found


def supernode_command(options: JoinOptions, faces_file: Path) -> list[str]:
    """The `flower-supernode` command line of this device."""
    if "'" in str(faces_file):
        raise DeviceError(f"the faces file path may not contain a quote: {faces_file}")
    node_config = f"faces='{faces_file}'" + (f" client-id='{options.client_id}'" if options.client_id else "")
    command = [flower_executable("flower-supernode"), "--superlink", options.superlink,
               "--host", "127.0.0.1", "--port", str(options.runtime_port), "--node-config", node_config]
    if options.insecure:
        command.append("--insecure")
    elif options.root_certificates is not None:
        command += ["--root-certificates", str(options.root_certificates)]
    if options.auth_key is not None:
        command += ["--auth-supernode-private-key", str(options.auth_key)]
    if options.max_wait_time is not None:
        command += ["--max-wait-time", str(options.max_wait_time)]
    return command


def check_faces(faces: np.ndarray) -> None:
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (112, 112, 3) or len(faces) == 0:
        raise DeviceError(f"expected aligned faces uint8 [n, 112, 112, 3], got {faces.dtype} {faces.shape}")


def join(options: JoinOptions, faces: np.ndarray) -> int:
    """Run this device's SuperNode until it exits (Ctrl+C, or the SuperLink gone past max_wait_time); returns
    its exit status. The faces file lives only while the SuperNode runs."""
    require_flower()
    options.check()
    check_faces(faces)
    folder = Path(tempfile.mkdtemp(prefix="privface-device-"))  # 0700: only this user reads the faces
    try:
        faces_file = folder / FACES_FILE
        np.save(faces_file, faces, allow_pickle=False)
        # the SuperNode starts Flower's other commands (flower-superexec, flwr-clientapp) by name: this venv first
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, **QUIET_FLOWER, "PATH": path}
        process = subprocess.Popen(supernode_command(options, faces_file), env=env)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            return process.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
