"""Every error the SDK raises, so that apps can catch one base class or one precise case.

Service errors carry the HTTP status and the RFC 9457 problem body the gateway returned; the two
face errors are raised on the device, before anything is sent.
"""
from __future__ import annotations

from typing import Any


class PrivfaceError(Exception):
    """Base class: `status` is the HTTP status (None for client-side errors), `problem` the problem body."""

    def __init__(self, message: str, status: int | None = None, problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}


class NoFaceError(PrivfaceError):
    """The photo shows no face the detector accepts."""

    def __init__(self, message: str = "no face found in the photo") -> None:
        super().__init__(message)


class MultipleFacesError(PrivfaceError):
    """The photo shows several faces and the face policy refuses them; `count` says how many."""

    def __init__(self, count: int, policy: str = "dominant") -> None:
        why = "none clearly the largest" if policy == "dominant" else "the face policy is 'single'"
        super().__init__(f"{count} faces found in the photo ({why}); pass face_policy='largest' to use the "
                         "largest one")
        self.count, self.policy = count, policy


class InvalidPhotoError(PrivfaceError, ValueError):
    """The photo cannot be used: not a decodable image, or an array of the wrong type or shape.

    Also a ValueError, as it was before it had a class of its own.
    """


class InvalidFeaturesError(PrivfaceError, ValueError):
    """Sealed mode: the features cannot be shared (not finite, or beyond the fixed-point range); nothing was sent.

    Also a ValueError, like InvalidPhotoError.
    """


class PrivacyBudgetError(PrivfaceError):
    """The transform in use spends more ε per image than the app allows (max_epsilon); nothing was sent."""


class SubsetKeyError(PrivfaceError):
    """The device's subset key file (random-subset transforms) is unreadable or not 32 bytes; nothing was sent."""


class AuthenticationError(PrivfaceError):
    """401: the API key is missing or invalid."""


class PermissionDeniedError(PrivfaceError):
    """403: the API key lacks the scope this call needs."""


class NotFoundError(PrivfaceError):
    """404: the subject (or route) does not exist for this tenant."""


class ConflictError(PrivfaceError):
    """409: e.g. a replayed payload nonce, or a subject without templates."""


class InvalidRequestError(PrivfaceError):
    """400/413/415/422: the request or its features were refused as invalid."""


class ServiceUnavailableError(PrivfaceError):
    """503 (or no connection) after every retry: a secure-computation party or the gateway is down."""


_BY_STATUS: dict[int, type[PrivfaceError]] = {
    401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError, 409: ConflictError,
    400: InvalidRequestError, 413: InvalidRequestError, 415: InvalidRequestError, 422: InvalidRequestError,
    503: ServiceUnavailableError,
}


def error_for(status: int, problem: dict[str, Any]) -> PrivfaceError:
    """The typed error for an HTTP error status and its problem+json body (title: detail)."""
    title = str(problem.get("title") or f"HTTP {status}")
    detail = str(problem.get("detail") or "")
    message = f"{title}: {detail}" if detail and detail != title else title
    return _BY_STATUS.get(status, PrivfaceError)(message, status=status, problem=problem)
