"""Sealed mode at a party (issue 12): the served sealed models, the opening of this party's envelope, and sealed
enrollment.

The gateway relays each party's envelope unopened (``client/sealed.py`` sealed it to this party's key,
``secure/sealed_box.py`` opens it). From the opened share of the features, both parties compute under MPC the
student, the unit embedding and the tenant's rotation (``secure/mpc/protocols/sealed_model.py``):
* enrollment (``POST /internal/sealed/prepare``): an "embed" job whose output, this party's share of the protected
  template, is prepared as a store in the op log: the same two-phase, all-or-nothing path as a gateway-mode share;
* verify: a verify match job whose query is that share (``matching.py``), so the threshold is the gallery's
  recorded one and only the decision is opened.

The models are read from ``PRIVFACE_PARTY_SEALED_MODEL_DIR`` (``<version>/sealed.json`` + ``layers.npz``, written
by ``inference/sealed_export.py``); the layers' sha256 is checked, and the hash of sealed.json (layer list, norm
scale, shape, transform) with the layers names the model in the job digest both parties compare before an MPC job
starts, together with the rotation and the request (nonce, transform, shape, operation): two parties whose files
differ, or fed envelopes of two different requests, do not start the job.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from common.problems import Problem as PartyProblem
from secure.mpc.engine import MatchJob
from secure.mpc.protocols.sealed_model import SealedQuery, check_layers
from secure.party.api import OpOut, SealedCheckOut, SealedIn, SealedPrepareIn
from secure.party.matching import MatchDesk, op_problem
from secure.party.nonces import NonceStore
from secure.party.oplog import OpError, OpLog, OpSpec
from secure.sealed_box import PartyKey, SealedError, open_share

log = logging.getLogger("privface.party.sealed")
SEALED_FILE = "sealed.json"
ORTHOGONAL_TOL = 1e-6  # the rotation must be orthogonal: a scaled or projecting map would change what a score means


@dataclass(frozen=True)
class SealedModel:
    """One served sealed model, as a party evaluates it."""

    version: str
    layers: list[dict[str, Any]] = field(repr=False)
    norm_hint: float
    dim: int
    shape: tuple[int, ...]
    transform_id: str
    digest: str  # sha256 of the canonical sealed.json and of layers.npz: the whole model, as both parties run it
    flip_signs: tuple[int, ...] | None = None  # test-time flip: per channel +-1 (sealed.json's flip_signs)


def load_sealed_model(root: Path, version: str) -> SealedModel:
    """``root/<version>``, its layers checked against the recorded sha256 (ValueError otherwise)."""
    folder = Path(root) / version
    meta = json.loads((folder / SEALED_FILE).read_text())
    raw = (folder / str(meta["layers_file"])).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != meta["layers_sha256"]:
        raise ValueError(f"sealed model {version}: layers.npz does not match its recorded sha256")
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    whole = hashlib.sha256(b"privface sealed model v1|" + canonical + b"|" + digest.encode()).hexdigest()
    arrays = np.load(io.BytesIO(raw))
    layers = []
    for i, entry in enumerate(meta["layers"]):
        layer = {key: value for key, value in entry.items() if key != "arrays"}
        layer.update({name: arrays[f"{i}.{name}"].astype(np.float64) for name in entry.get("arrays", [])})
        layers.append(layer)
    check_layers(layers)
    return SealedModel(version=version, layers=layers, norm_hint=float(meta["norm_hint"]),
                       dim=int(meta["embedding_dim"]), shape=tuple(int(v) for v in meta["shape"]),
                       transform_id=str(meta["transform_id"]), digest=whole,
                       flip_signs=parse_flip_signs(meta.get("flip_signs"), int(meta["shape"][0])))


def parse_flip_signs(value: Any, channels: int) -> tuple[int, ...] | None:
    """sealed.json's ``flip_signs``: absent/null (no test-time flip) or one +1/-1 per feature channel."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != channels or any(type(v) is not int or v not in (1, -1)
                                                                     for v in value):
        raise ValueError(f"flip_signs must be {channels} values of +1 or -1")
    return tuple(int(v) for v in value)


def _refused(slug: str, detail: str) -> PartyProblem:
    """The caller's envelope is unusable here: a 422 the gateway passes on as the caller's fault."""
    return PartyProblem(422, slug, "Sealed input refused", detail)


def _replayed(slug: str, detail: str) -> PartyProblem:
    """A payload resent, stale or used for another operation: the gateway checks freshness and nonces first, so
    only a relay that replays gets here (409; the gateway answers its caller 503)."""
    return PartyProblem(409, slug, "Sealed input already used", detail)


def _misconfigured(slug: str, detail: str) -> PartyProblem:
    """What the gateway sent besides the envelope (model, transform, rotation) does not fit this party: a
    deployment fault, answered 503 so that the caller is not blamed."""
    return PartyProblem(503, slug, "Sealed mode misconfigured", detail)


class SealedInputs:
    """Opens this party's envelopes into ``SealedQuery`` inputs of MPC jobs (models loaded once, by version)."""

    def __init__(self, rank: int, key: PartyKey, model_dir: Path, nonces: NonceStore) -> None:
        self.rank, self.key, self.model_dir, self.nonces = rank, key, Path(model_dir), nonces
        self._models: dict[str, SealedModel] = {}
        self._lock = threading.Lock()

    def model(self, version: str) -> SealedModel:
        with self._lock:
            if version not in self._models:
                try:
                    self._models[version] = load_sealed_model(self.model_dir, version)
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("sealed model %s not served: %s", version, type(exc).__name__)
                    raise _misconfigured("sealed-model-unknown",
                                         f"this party serves no sealed model {version!r}") from None
            return self._models[version]

    def query(self, body: SealedIn) -> SealedQuery:
        """This party's share of the features (from its envelope only) with the model and the rotation."""
        model = self.model(body.model)
        if body.transform_id != model.transform_id or tuple(body.shape) != model.shape:
            raise _misconfigured("sealed-mismatch",
                                 f"model {model.version} reads {model.transform_id} {list(model.shape)}")
        context = {"transform_id": body.transform_id, "shape": body.shape, "nonce": body.nonce,
                   "operation": body.operation, "created_at": body.created_at}
        try:
            share = open_share(body.envelope.model_dump(), self.rank, self.key, context)
        except SealedError as exc:
            raise _refused("sealed-envelope", str(exc)) from None
        # after the envelope opened: created_at and the nonce are then the SDK's, not a relay's invention
        if not self.nonces.fresh(body.created_at):
            raise _replayed("sealed-stale", "the sealed payload's created_at is outside this party's window")
        if self.nonces.seen(body.nonce):
            raise _replayed("sealed-replay", "this sealed payload's nonce was already used")
        rotation = self._rotation(body.rotation, model.dim)
        request = json.dumps({"nonce": body.nonce, "transform_id": body.transform_id, "shape": list(body.shape),
                              "operation": body.operation}, sort_keys=True).encode()
        name = hashlib.sha256(model.digest.encode() + rotation.tobytes() + repr(model.norm_hint).encode() + request)
        return SealedQuery(features=share[None], layers=model.layers, norm_hint=model.norm_hint, rotation=rotation,
                           digest=name.hexdigest(), flip_signs=model.flip_signs)

    def use(self, body: SealedIn, operation: str) -> None:
        """Spend the payload's nonce on an MPC job of ``operation`` (the one bound into the envelope); a nonce used
        before, or a payload sealed for another operation, is refused (nothing runs)."""
        if body.operation != operation:
            raise _replayed("sealed-operation", f"this payload was sealed for {body.operation}, not {operation}")
        if not self.nonces.use(body.nonce, operation):
            raise _replayed("sealed-replay", "this sealed payload's nonce was already used")

    @staticmethod
    def _rotation(text: str, dim: int) -> np.ndarray:
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise _misconfigured("sealed-rotation", "rotation is not base64") from None
        if len(raw) != 8 * dim * dim:
            raise _misconfigured("sealed-rotation", f"rotation must be float64 [{dim}, {dim}]")
        rotation = np.frombuffer(raw, dtype="<f8").reshape(dim, dim).astype(np.float64)
        if not np.all(np.isfinite(rotation)) or np.max(np.abs(rotation @ rotation.T - np.eye(dim))) > ORTHOGONAL_TOL:
            raise _misconfigured("sealed-rotation", "rotation must be orthogonal")
        return rotation


def sealed_routes(api: APIRouter, desk: MatchDesk, oplog: OpLog, inputs: SealedInputs) -> None:
    """``POST /internal/sealed/check``: can this party use its sealed input (its envelope opens, the model is served,
    the rotation is orthogonal)? The gateway asks both parties before any sealed MPC job, so that a party never
    waits in the MPC for a peer that refused its input. ``POST /internal/sealed/prepare``: sealed enrollment's
    first phase (see the module docstring)."""

    @api.post("/sealed/check", response_model=SealedCheckOut)
    async def sealed_check(body: SealedIn) -> SealedCheckOut:
        sealed = await run_in_threadpool(inputs.query, body)
        return SealedCheckOut(ok=True, dim=sealed.dim)

    @api.post("/sealed/prepare", response_model=OpOut)
    async def sealed_prepare(body: SealedPrepareIn) -> OpOut:
        known = await run_in_threadpool(oplog.op_state, body.seq)
        if known is not None:  # a resent prepare never runs a second MPC job; the op log keeps the first answer
            return OpOut(seq=body.seq, state=known)
        sealed = inputs.query(body.sealed)
        inputs.use(body.sealed, "enroll")
        await desk.spend_budget(_Ref(body))
        job = MatchJob(job_id=body.job_id, kind="embed", query_share=np.zeros(sealed.dim, dtype=np.int64),
                       gallery_share=np.zeros((0, sealed.dim), dtype=np.int64), labels=np.zeros(0, dtype=np.int64),
                       threshold=0.0, sealed=sealed)
        status, result = await desk.run(_Ref(body), job)
        await desk.audit_job(_Ref(body), 0, 1, status)
        if isinstance(result, PartyProblem):
            raise result
        share = np.asarray(result, dtype=np.int64).astype("<i8").tobytes()
        spec = OpSpec(seq=body.seq, kind="store", gallery=body.gallery, template_seq=body.template_seq, share=share)
        try:
            state = await run_in_threadpool(oplog.prepare, spec)
        except OpError as exc:
            raise op_problem(exc) from None
        log.info("prepared sealed op %d", body.seq)
        return OpOut(seq=body.seq, state=state)


@dataclass(frozen=True)
class _Ref:
    """A sealed enrollment named as a job for the budget, the audit and the run (``matching.JobRef``)."""

    body: SealedPrepareIn

    @property
    def job_id(self) -> str:
        return self.body.job_id

    @property
    def kind(self) -> str:
        return "embed"

    @property
    def gallery(self) -> str:
        return self.body.gallery

    @property
    def timeout_s(self) -> float | None:
        return self.body.timeout_s
