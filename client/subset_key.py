"""The device's subset key: which channels a random-subset transform releases from this device.

Why a key kept on the device and not a fresh draw per photo: a server that receives the same photo twice, or many
photos of one person, merges fresh subsets into most of the spectrum (docs/attacks/README.md, "The same photo sent
again"); with the key every photo from the device releases the same channels (`inference.transform.
PinnedSubsetNoise`). The key is 32 bytes from os.urandom, written once with mode 0600 and never sent.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from client.environment import SUBSET_KEY_ENV
from client.errors import SubsetKeyError
from inference.transform import SUBSET_KEY_BYTES, PinnedSubsetNoise

DEFAULT_PATH = Path("~/.config/privface/subset.key")


def subset_key_path() -> Path:
    return Path(os.environ.get(SUBSET_KEY_ENV) or DEFAULT_PATH).expanduser()


def pinned_noise(key: object) -> PinnedSubsetNoise:
    """The SDK's noise source for a key an app passes itself; SubsetKeyError unless it is 32 bytes."""
    if not isinstance(key, (bytes, bytearray)) or len(key) != SUBSET_KEY_BYTES:
        size = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise SubsetKeyError(f"a subset key is {SUBSET_KEY_BYTES} bytes, not {size}")
    return PinnedSubsetNoise(bytes(key))


def load_or_create(path: Path) -> bytes:
    """The key at `path`, created from os.urandom on first use. The key is written and synced under a temporary
    name, then linked into place (link fails if a key exists): a reader never sees a partial key, and two processes
    starting together both end up with the one key that was linked first."""
    if not path.exists():
        try:
            _create(path)
        except OSError as exc:
            raise SubsetKeyError(f"cannot create the subset key {path}: {exc.strerror or exc}") from None
    return _read(path)


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(SUBSET_KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(staging, path)
        except FileExistsError:
            pass  # another process linked its key first: use that one
    finally:
        staging.unlink(missing_ok=True)


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            key = handle.read(SUBSET_KEY_BYTES + 1)
    except OSError as exc:
        raise SubsetKeyError(f"cannot read the subset key {path}: {exc.strerror or exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.getuid():
        raise SubsetKeyError(f"the subset key {path} must belong to this user with mode 0600 (it is "
                             f"{stat.S_IMODE(info.st_mode):o}, owner {info.st_uid})")
    if len(key) != SUBSET_KEY_BYTES:
        raise SubsetKeyError(f"the subset key {path} holds {len(key)} bytes, not {SUBSET_KEY_BYTES} (delete it to "
                             "draw a new one)")
    return key
