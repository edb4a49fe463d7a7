"""How the gateway reads the parties' answers: one party's reply to one call, and the errors ``PartyPair`` raises.

Why apart from ``secure/coordinator.py``: what counts as "unavailable" (no answer, 5xx, a refused credential),
"out of sync" and "refused" is one decision table, used by every call of the client.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from secure.party.api import OpOut

CANCELLED = 499  # the status given to the call we stop waiting for once the other party has refused
M = TypeVar("M", bound=BaseModel)


class PartiesError(Exception):
    """A party refused or failed a call."""

    def __init__(self, message: str, *, status: int | None = None,
                 problems: Sequence[dict[str, Any] | None] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.problems = list(problems or [])


class PartiesUnavailable(PartiesError):
    """A party could not be reached in time, or said it is unavailable (503)."""


class PartiesOutOfSync(PartiesError):
    """A party is behind the requested snapshot (pending ops), or the two parties' snapshots differ."""

    def __init__(self, message: str, *, pending: dict[int, list[int]] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.pending = pending or {}


class Reply:
    """One party's answer to one call: status None when it gave none (``error`` says why)."""

    __slots__ = ("rank", "status", "body", "error")

    def __init__(self, rank: int, status: int | None, body: Any, error: BaseException | None = None) -> None:
        self.rank, self.status, self.body, self.error = rank, status, body, error

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def slug(self) -> str:
        if isinstance(self.body, dict):
            return str(self.body.get("type", "")).rsplit("/", 1)[-1]
        return ""

    @property
    def problem(self) -> dict[str, Any] | None:
        """The refusal's problem+json body (None for a success or a body that is not one)."""
        return self.body if not self.ok and isinstance(self.body, dict) else None

    @property
    def state(self) -> str | None:
        """An operation's state from an ``OpOut`` answer (None when the call failed)."""
        if not self.ok:
            return None
        try:
            return OpOut.model_validate(self.body).state
        except ValidationError:
            return None

    @property
    def unavailable(self) -> bool:
        # no answer, a server-side failure, or a party that rejects our internal credentials (misconfiguration)
        return self.status is None or self.status >= 500 or self.status in (401, 403)

    def parsed(self, model: type[M]) -> M:
        try:
            return model.model_validate(self.body)
        except ValidationError:
            raise PartiesError(f"party {self.rank} sent a malformed {model.__name__}", status=self.status) from None


def raise_unavailable(replies: Iterable[Reply], what: str = "") -> None:
    """PartiesUnavailable naming every party that could not serve the call; nothing if both could."""
    down = [r for r in replies if r.unavailable]
    if down:
        who = ", ".join(f"party {r.rank} ({r.status or type(r.error).__name__})" for r in down)
        raise PartiesUnavailable(f"{what + ': ' if what else ''}unavailable: {who}", status=503)
