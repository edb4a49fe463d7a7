"""`privface client ...`: the SDK on the command line (create-subject, enroll, verify, identify, delete).

Results go to stdout as one JSON object per line, so scripts can parse them. Every failure is ONE line
`error: ...` on stderr: exit status 2 for usage and input problems (bad arguments, unreadable photo,
no face or several faces), 1 for errors the service reports (or an unreachable service).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from client.detect import DEFAULT_FACE_POLICY, FACE_POLICIES, FacePolicy
from client.environment import API_KEY_ENV, URL_ENV
from client.errors import InvalidPhotoError, MultipleFacesError, NoFaceError, PrivfaceError
from client.features import FeaturePayload
from client.sdk import PrivfaceClient

EXIT_SERVICE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A usage or input problem (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing a multi-line usage block and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    # Connection options work before or after the command: SUPPRESS keeps an option not repeated after the
    # command from being reset to a default by the subcommand parser.
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="gateway base URL (env PRIVFACE_URL)")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env PRIVFACE_API_KEY)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per request (10)")
    common.add_argument("--max-epsilon", type=float, default=argparse.SUPPRESS,
                        help="refuse to send features whose per-image privacy budget exceeds this")
    common.add_argument("--sealed-pins", default=argparse.SUPPRESS,
                        help="sealed mode: the parties' key fingerprints '<party 0>,<party 1>' from the operator "
                             "(env PRIVFACE_SDK_SEALED_KEY_PINS)")
    common.add_argument("--require-sealed", action="store_true", default=argparse.SUPPRESS,
                        help="refuse to send features in the clear if the gateway is not in sealed mode")
    parser = _Parser(prog="privface client", parents=[common], description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    create = commands.add_parser("create-subject", parents=[common], help="create a subject; prints it")
    create.add_argument("--external-id", help="your own id for the subject")
    enroll = commands.add_parser("enroll", parents=[common], help="enroll one or more photos for a subject")
    enroll.add_argument("subject_id")
    enroll.add_argument("photos", nargs="+", type=Path)
    verify = commands.add_parser("verify", parents=[common], help="1:1 - is the photo this subject?")
    verify.add_argument("subject_id")
    verify.add_argument("photo", type=Path)
    identify = commands.add_parser("identify", parents=[common], help="1:N - which subject is the photo?")
    identify.add_argument("photo", type=Path)
    features = commands.add_parser("features", parents=[common],
                                   help="print the feature payload of a photo (for curl); nothing is uploaded")
    features.add_argument("photo", type=Path)
    features.add_argument("-o", "--output", type=Path,
                          help="write the payload to this file, only once it is made (a shell redirection "
                               "would leave an empty file behind on failure)")
    delete = commands.add_parser("delete", parents=[common], help="delete a subject and its templates")
    delete.add_argument("subject_id")
    for command in (enroll, verify, identify, features):
        command.add_argument("--face-policy", choices=FACE_POLICIES, default=DEFAULT_FACE_POLICY,
                             help="with several faces in a photo - dominant (default): the largest if it is "
                                  "clearly the largest, else refuse; single: refuse; largest: the largest")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        with _client(args) as client:
            for result in _run(client, args):
                print(json.dumps(result), flush=True)
        return 0
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except PrivfaceError as exc:
        return _fail(str(exc), EXIT_SERVICE)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one error line, never a traceback
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_SERVICE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, status: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _client(args: argparse.Namespace) -> PrivfaceClient:
    url = getattr(args, "url", None) or os.environ.get(URL_ENV)
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV)
    if not url:
        raise UsageError("no gateway URL: pass --url or set PRIVFACE_URL")
    if not api_key:
        raise UsageError("no API key: pass --api-key or set PRIVFACE_API_KEY")
    return PrivfaceClient(url, api_key, timeout=getattr(args, "timeout", 10.0),
                          max_epsilon=getattr(args, "max_epsilon", None),
                          sealed_pins=getattr(args, "sealed_pins", None),
                          require_sealed=getattr(args, "require_sealed", False))


def _run(client: PrivfaceClient, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The command's results, one JSON-able dict each, yielded as soon as each is known."""
    if args.command == "create-subject":
        yield client.create_subject(args.external_id)
    elif args.command == "delete":
        client.delete_subject(args.subject_id)
        yield {"deleted": args.subject_id}
    elif args.command == "features":
        payload = dict(_features(client, args.photo, args.face_policy))
        if args.output is None:
            yield payload
        else:
            _write_atomically(args.output, json.dumps(payload) + "\n")
    elif args.command == "verify":
        yield {"match": client.verify_features(args.subject_id, _features(client, args.photo, args.face_policy))}
    elif args.command == "identify":
        subject_id = client.identify_features(_features(client, args.photo, args.face_policy))
        yield {"match": subject_id is not None, "subject_id": subject_id}
    else:
        yield from _enroll(client, args.subject_id, args.photos, args.face_policy)


def _enroll(client: PrivfaceClient, subject_id: str, photos: list[Path],
            face_policy: FacePolicy) -> Iterator[dict[str, Any]]:
    """Make every photo's features first, so a bad photo stops the command before anything is enrolled.

    Each enrollment is reported as soon as it is stored, so a later failure leaves a clear record.
    The progress bars (several photos only) are closed before an error line is printed.
    """
    payloads = []
    with tqdm(photos, "features", disable=len(photos) < 2) as bar:
        for photo in bar:
            payloads.append(_features(client, photo, face_policy))
    with tqdm(payloads, "enroll", disable=len(photos) < 2) as bar:
        for payload in bar:
            yield client.enroll_features(subject_id, payload)


def _features(client: PrivfaceClient, photo: Path, face_policy: FacePolicy) -> FeaturePayload:
    """The photo's payload; input problems are reported with the photo's name (exit status 2)."""
    _ = client.transform  # fetched first, so that a gateway problem is not blamed on the photo
    try:
        data = photo.read_bytes()
    except OSError as exc:
        raise UsageError(f"{photo}: cannot read: {exc.strerror or exc}") from None
    try:
        return client.features(data, face_policy)
    except MultipleFacesError as exc:
        raise UsageError(f"{photo}: {exc.count} faces found in the photo and the face policy "
                         f"'{face_policy}' refuses them; pass --face-policy largest to use the largest one") from None
    except (InvalidPhotoError, NoFaceError, ValueError) as exc:  # ValueError: e.g. degenerate landmarks
        raise UsageError(f"{photo}: {exc}") from None


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, so `path` is never left half-written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None


if __name__ == "__main__":
    sys.exit(main())
