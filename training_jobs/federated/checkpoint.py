"""Per-round state of a federated run on disk, so a run killed mid-job resumes from its last finished round.

What a resumed run needs and nothing else: the global travelling parameters after the last finished round, its
index, the clients' class vectors (keyed by client id, since node ids change when the processes restart), and
the log so far (round entries, held-out metrics, the baseline) so the final report is whole. The file is written
to a temporary name and renamed (os.replace is atomic on one file system): a kill during the write leaves the
previous round's state, never a torn file. A fingerprint of the run's settings is stored with it; a run with
other settings refuses the state rather than silently continuing someone else's training.

The state directory also carries the cancel request: `cancel_path(dir)` is created by the job that drives the
run, and the ServerApp stops after the round in progress when it sees the file. In the deployment runtime it also
names the one Flower run that owns it (`claim`): the first ServerApp to start writes its run id there, and any
other run pointed at the same directory refuses to train, so a job that submitted twice (its worker killed
between `flwr run` and recording the run id) still trains its devices once, in the run the directory names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE = "state.npz"
CANCEL_FILE = "cancel"
OWNER_FILE = "owner.json"
_PARAM, _CLASS, _META = "param:", "class:", "meta"


class CheckpointMismatch(ValueError):
    """The state on disk belongs to a run with different settings."""


class StateDirTaken(RuntimeError):
    """Another Flower run owns this state directory."""


def fingerprint(settings: dict[str, Any]) -> str:
    """A stable digest of the settings that determine the training (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class RoundState:
    """Everything a run needs to continue after `round` (0: only the starting evaluation is done)."""

    round: int
    arrays: dict[str, np.ndarray]
    class_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def state_path(directory: Path) -> Path:
    return Path(directory) / STATE_FILE


def cancel_path(directory: Path) -> Path:
    return Path(directory) / CANCEL_FILE


def owner(directory: Path) -> int | None:
    """The id of the Flower run that owns the directory, or None before any ServerApp claimed it."""
    path = Path(directory) / OWNER_FILE
    return int(json.loads(path.read_text())["run-id"]) if path.exists() else None


def claim(directory: Path, run_id: int) -> None:
    """Make `run_id` the directory's owner if it has none (exclusive create: of two runs starting together, one
    wins); StateDirTaken if another run owns it. The owner claiming again (a restarted ServerApp) is fine."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f"{OWNER_FILE}.{run_id}.tmp"
    temporary.write_text(json.dumps({"run-id": int(run_id)}))
    try:
        os.link(temporary, directory / OWNER_FILE)  # atomic, fails if the name exists; never a half-written file
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    holder = owner(directory)
    if holder != int(run_id):
        raise StateDirTaken(f"{directory} belongs to Flower run {holder}; run {run_id} refuses to train into it")


def save(directory: Path, state: RoundState) -> Path:
    """Write the state atomically (temporary file, fsync, rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"round": state.round, "log": state.log, "fingerprint": state.fingerprint}
    payload = {_META: np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)}
    payload.update({_PARAM + name: value for name, value in state.arrays.items()})
    payload.update({_CLASS + client: value for client, value in state.class_vectors.items()})
    target = state_path(directory)
    temporary = target.with_name(target.name + ".tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, allow_pickle=True, **payload)  # numpy's default, named so no array can be taken for it
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    return target


def load(directory: Path, expected_fingerprint: str | None = None) -> RoundState | None:
    """The saved state, or None when there is none; CheckpointMismatch when it belongs to other settings."""
    path = state_path(directory)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data[_META].tobytes().decode())
        arrays = {key[len(_PARAM):]: data[key] for key in data.files if key.startswith(_PARAM)}
        classes = {key[len(_CLASS):]: data[key] for key in data.files if key.startswith(_CLASS)}
    if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
        raise CheckpointMismatch(f"the state in {directory} was saved by a run with other settings "
                                 f"({meta['fingerprint']} != {expected_fingerprint}); remove it or use a new directory")
    return RoundState(int(meta["round"]), arrays, classes, meta["log"], meta["fingerprint"])
