"""The device's subset key: which channels a random-subset transform releases from this device.

Why a key kept on the device and not a fresh draw per photo: a server that receives the same photo twice, or many
photos of one person, merges fresh subsets into most of the spectrum (docs/attacks/README.md, "The same photo sent
again"); with the key every photo from the device releases the same channels (`inference.transform.
PinnedSubsetNoise`). The key is 32 bytes from os.urandom, written once with mode 0600 and never sent.
"""
from __future__ import annotations

import os
from pathlib import Path

from client.environment import SUBSET_KEY_ENV
from client.errors import SubsetKeyError
from inference.transform import SUBSET_KEY_BYTES

DEFAULT_PATH = Path("~/.config/privface/subset.key")


def subset_key_path() -> Path:
    return Path(os.environ.get(SUBSET_KEY_ENV) or DEFAULT_PATH).expanduser()


def load_or_create(path: Path) -> bytes:
    """The key at `path`, created from os.urandom on first use (exclusive create: two processes starting together
    end up with the one key that was written first)."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    except OSError as exc:
        raise SubsetKeyError(f"cannot create the subset key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(SUBSET_KEY_BYTES))
        out.flush()
        os.fsync(out.fileno())
    return _read(path)


def _read(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SubsetKeyError(f"cannot read the subset key {path}: {exc.strerror}") from None
    if len(key) != SUBSET_KEY_BYTES:
        raise SubsetKeyError(f"the subset key {path} holds {len(key)} bytes, not {SUBSET_KEY_BYTES} (delete it to "
                             "draw a new one)")
    return key
