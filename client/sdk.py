"""`PrivfaceClient`: the REST client apps embed (sync, httpx).

It turns photos into noised features on the device (client.features) and sends only those. Retries are
limited to cases where resending is safe: the gateway answered 503 (it says nothing was kept), or no
connection could be made (nothing was sent). Other failures, a read timeout included, are raised at
once, because the request may already have taken effect (e.g. an enrollment).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from client.detect import DEFAULT_FACE_POLICY, FaceDetector, FacePolicy
from client.errors import (InvalidFeaturesError, InvalidRequestError, PrivacyBudgetError, PrivfaceError,
                           ServiceUnavailableError, error_for)
from client.features import FeaturePayload, Photo, extract_features, with_fresh_nonce
from client.environment import SEALED_PINS_ENV
from client.sealed import parse_pins, pinned_keys, sealed_payload
from client.subset_key import load_or_create, pinned_noise, subset_key_path
from inference.transform import TransformSpec

T = TypeVar("T")
MAX_RETRY_WAIT_S = 30.0  # a Retry-After beyond this is capped, so a call never hangs for minutes


class PrivfaceClient:
    """One gateway, one API key. Safe to share between threads (detection is serialised)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0, retries: int = 3,
                 transform: TransformSpec | None = None, *, backoff_s: float = 0.5,
                 max_epsilon: float | None = None, sealed_pins: str | None = None,
                 require_sealed: bool = False, subset_key: bytes | None = None) -> None:
        """max_epsilon: the most per-image ε the app accepts. The gateway chooses the transform, so without
        this cap a misconfigured gateway could ask for weakly noised (or clean) features; None accepts any.
        sealed_pins: the parties' key fingerprints, ``"<party 0>,<party 1>"``, from the operator, not from the
        gateway (default: $PRIVFACE_SDK_SEALED_KEY_PINS); sealed mode refuses to seal without them or to a key
        that differs. require_sealed: refuse to send features in the clear when the gateway says gateway mode.
        subset_key: a random-subset transform's channel choice for this device (32 bytes; default: the key file of
        client/subset_key.py, created on first use): every photo sent through this client releases the same channels.
        """
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"})
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_epsilon = max_epsilon
        self._transform = transform
        self._transform_given = transform is not None
        self._detector: FaceDetector | None = None
        self._lock = threading.Lock()
        self._mode: str | None = None  # the tenant's mode, from GET /v1/transforms
        self._keys: dict[int, str] | None = None  # sealed mode: the parties' keys, checked against the pins
        self._pins = sealed_pins if sealed_pins is not None else os.environ.get(SEALED_PINS_ENV)
        self._require_sealed = require_sealed
        self._subset_noise = pinned_noise(subset_key) if subset_key is not None else None

    def __enter__(self) -> "PrivfaceClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- subjects ------------------------------------------------------------------------------------

    def create_subject(self, external_id: str | None = None) -> dict[str, Any]:
        """Create a subject; returns it ({"id", "external_id", "created_at", "enrollments"})."""
        subject: dict[str, Any] = self._request("POST", "/v1/subjects", {"external_id": external_id})
        return subject

    def get_subject(self, subject_id: str) -> dict[str, Any]:
        """A subject and its enrollments' metadata."""
        subject: dict[str, Any] = self._request("GET", f"/v1/subjects/{quote(subject_id, safe='')}")
        return subject

    def delete_subject(self, subject_id: str) -> None:
        """Delete a subject and its templates at both parties."""
        self._request("DELETE", f"/v1/subjects/{quote(subject_id, safe='')}")

    # -- biometrics from photos ----------------------------------------------------------------------

    def features(self, photo: Photo, face_policy: FacePolicy = DEFAULT_FACE_POLICY) -> FeaturePayload:
        """The payload for `photo` under the served transform; raises NoFaceError / MultipleFacesError."""
        spec = self.transform
        if self._max_epsilon is not None and not spec.epsilon_per_image <= self._max_epsilon:
            raise PrivacyBudgetError(f"transform {spec.transform_id} spends ε={spec.epsilon_per_image:g} per image; "
                                     f"this client allows at most {self._max_epsilon:g}")
        with self._lock:
            if self._detector is None:
                self._detector = FaceDetector()
            if spec.random_channels is not None and self._subset_noise is None:  # the key file only when needed
                self._subset_noise = pinned_noise(load_or_create(subset_key_path()))
            noise = self._subset_noise if spec.random_channels is not None else None
            return extract_features(photo, spec, face_policy, self._detector, noise)

    def enroll(self, subject_id: str, photo: Photo, face_policy: FacePolicy = DEFAULT_FACE_POLICY) -> dict[str, Any]:
        """Enroll the face in `photo` for the subject; returns the enrollment's metadata."""
        return self._with_photo(photo, face_policy, lambda features: self.enroll_features(subject_id, features))

    def verify(self, subject_id: str, photo: Photo, face_policy: FacePolicy = DEFAULT_FACE_POLICY) -> bool:
        """1:1: is the face in `photo` the subject?"""
        return self._with_photo(photo, face_policy, lambda features: self.verify_features(subject_id, features))

    def identify(self, photo: Photo, face_policy: FacePolicy = DEFAULT_FACE_POLICY) -> str | None:
        """1:N: the id of the matching subject, or None."""
        return self._with_photo(photo, face_policy, self.identify_features)

    def _with_photo(self, photo: Photo, face_policy: FacePolicy, send: Callable[[FeaturePayload], T]) -> T:
        """Send the photo's features; if the gateway has moved to another transform since we fetched ours,
        fetch the new one and send once more. That second payload is a second noisy release of the face
        (the gateway received the refused one), so the per-image ε is spent twice in that rare case.
        """
        try:
            return send(self.features(photo, face_policy))
        except InvalidRequestError as exc:
            if self._transform_given or not str(exc.problem.get("type", "")).endswith("/unknown-transform"):
                raise
        self._transform = self._fetch_transform()
        return send(self.features(photo, face_policy))

    # -- biometrics from precomputed features --------------------------------------------------------

    def enroll_features(self, subject_id: str, features: FeaturePayload) -> dict[str, Any]:
        path = f"/v1/subjects/{quote(subject_id, safe='')}/enrollments"
        if self.mode == "sealed":
            return dict(self._sealed_request(f"/v1/sealed{path[3:]}", {}, features, "enroll"))
        enrollment: dict[str, Any] = self._request("POST", path, {"features": features})
        return enrollment

    def verify_features(self, subject_id: str, features: FeaturePayload) -> bool:
        if self.mode == "sealed":
            sealed = self._sealed_request("/v1/sealed/verify", {"subject_id": subject_id}, features, "verify")
            return bool(sealed["match"])
        return bool(self._request("POST", "/v1/verify", {"subject_id": subject_id, "features": features})["match"])

    def identify_features(self, features: FeaturePayload) -> str | None:
        if self.mode == "sealed":
            result = self._sealed_request("/v1/sealed/identify", {}, features, "identify")
        else:
            result = self._request("POST", "/v1/identify", {"features": features})
        return result["subject_id"] if result["match"] else None

    # -- sealed mode (docs/sealed.md) ----------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The tenant's mode from ``GET /v1/transforms`` ('gateway' or 'sealed'), fetched once; with
        ``require_sealed`` anything but 'sealed' is refused, so a gateway cannot downgrade the client."""
        if self._mode is None:
            served = self.transforms()
            self._mode = str(served[0].get("mode", "gateway")) if served else "gateway"
        if self._require_sealed and self._mode != "sealed":
            raise PrivfaceError(f"the gateway serves mode {self._mode!r}; this client requires sealed mode and "
                                "sends no features in the clear")
        return self._mode

    def _party_keys(self) -> dict[int, str]:
        """Both parties' sealed keys, fetched once and accepted only if they match the pins (never refetched: a
        second key set offered by the gateway would be no more trustworthy than the first)."""
        if self._keys is None:
            try:
                if not self._pins:
                    raise ValueError(f"no pinned key fingerprints: set {SEALED_PINS_ENV} or pass sealed_pins")
                self._keys = pinned_keys(self._request("GET", "/v1/sealed/keys"), parse_pins(self._pins))
            except (ValueError, KeyError, TypeError) as exc:
                raise PrivfaceError(f"sealed mode refused: {exc}") from exc
        return self._keys

    def _sealed_request(self, path: str, fields: dict[str, Any], features: FeaturePayload, operation: str) -> Any:
        """Seal the features to the pinned keys and send. A retry (503) seals fresh shares of the same features
        to the same pinned keys; a refused envelope (422) is raised, never re-sealed to other keys."""
        def body() -> dict[str, Any]:
            keys = self._party_keys()
            try:
                return {**fields, "sealed": sealed_payload(dict(features), keys, operation)}
            except ValueError as exc:  # the features themselves (keys were checked above)
                raise InvalidFeaturesError(f"sealed mode: {exc}; nothing was sent") from exc

        return self._request("POST", path, body(), remake=lambda _: body())

    # -- transform -----------------------------------------------------------------------------------

    def transforms(self) -> list[dict[str, Any]]:
        """The transforms the gateway serves: [{"transform_id", "params_hash", "spec", ...}]."""
        transforms: list[dict[str, Any]] = self._request("GET", "/v1/transforms")
        return transforms

    @property
    def transform(self) -> TransformSpec:
        """The transform given at construction, else the one the gateway serves (fetched once)."""
        if self._transform is None:
            self._transform = self._fetch_transform()
        return self._transform

    def _fetch_transform(self) -> TransformSpec:
        served = self.transforms()
        if not served:
            raise ServiceUnavailableError("the gateway serves no transform yet (no active model)")
        entry = served[0]
        self._mode = str(entry.get("mode", "gateway"))
        spec = TransformSpec.from_dict(entry["spec"])
        if (spec.transform_id, spec.params_hash) != (entry["transform_id"], entry["params_hash"]):
            raise PrivfaceError(f"the served transform {entry['transform_id']}/{entry['params_hash']} rebuilds here "
                                f"as {spec.transform_id}/{spec.params_hash}: the SDK and gateway versions differ")
        return spec

    # -- HTTP ----------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 remake: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Any:
        """Send with retries on 503 / connection failure; the decoded JSON (None for 204) or a typed error.
        A retried body gets a fresh nonce (``remake``: how, when the nonce is sealed inside it)."""
        for attempt in range(self._retries + 1):
            if attempt and body and remake is not None:
                body = remake(body)
            elif attempt and body and "features" in body:
                body = {**body, "features": with_fresh_nonce(body["features"])}
            last = attempt == self._retries
            try:
                response = self._http.request(method, path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if last:
                    raise ServiceUnavailableError(f"cannot connect to {self._http.base_url}: {exc}") from exc
                time.sleep(self._backoff(attempt, None))
                continue
            except httpx.HTTPError as exc:
                raise PrivfaceError(f"{method} {path} failed: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 503 and not last:
                time.sleep(self._backoff(attempt, response.headers.get("Retry-After")))
                continue
            return _result(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """The server's Retry-After when given, else exponential backoff; capped at MAX_RETRY_WAIT_S."""
        wait = _retry_after_s(retry_after)
        if wait is None:
            wait = self._backoff_s * 2 ** attempt
        return min(max(wait, 0.0), MAX_RETRY_WAIT_S)


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 §10.2.3); None if absent/bad."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - datetime.now(timezone.utc)).total_seconds()


def _result(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json() if response.content else None
    raise error_for(response.status_code, _problem(response))


def _problem(response: httpx.Response) -> dict[str, Any]:
    """The RFC 9457 body, or a stand-in built from the status line when the body is not JSON."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    return {"title": response.reason_phrase or f"HTTP {response.status_code}", "status": response.status_code,
            "detail": response.text[:200]}
