"""Abuse controls: per-API-key and per-subject budgets, and the verify lock-out of a subject.

A client holding an API key has a one-bit oracle: verify hill-climbs on one subject's template, identify
at large N enumerates subjects. Budgets bound how fast it can ask; the lock-out stops it after a few
consecutive non-matches on one subject. Requests are admitted here *before* anything else happens, so a
refused request spends no nonce, writes nothing and never reaches the parties.
Counters live in `app.services.counters` (Redis when configured, in-process otherwise).
"""
from __future__ import annotations

import math
from typing import Literal

from app.auth import Principal
from app.metrics import BUDGET_REFUSALS
from app.problems import Problem
from app.services.counters import Budget, Counters
from app.settings import GatewaySettings

RouteClass = Literal["verify", "identify", "enroll"]


def too_many_requests(what: str, wait_s: float) -> Problem:
    return Problem(429, "rate-limited", "Too many requests",
                   f"{what} is spent; retry after {retry_after(wait_s)} s",
                   headers={"Retry-After": str(retry_after(wait_s))})


def subject_locked(subject_id: str, wait_s: float) -> Problem:
    """423 Locked: the subject, not the caller, is what is refused (any key of the tenant gets this)."""
    until = "until an admin unlocks it" if math.isinf(wait_s) else f"for {retry_after(wait_s)} s more"
    headers = {} if math.isinf(wait_s) else {"Retry-After": str(retry_after(wait_s))}
    return Problem(423, "subject-locked", "Subject locked for verification",
                   f"subject {subject_id!r} is locked after repeated failed verifications, {until}",
                   headers=headers)


def retry_after(wait_s: float) -> int:
    """Whole seconds, rounded up, at least 1 (Retry-After is an integer)."""
    return max(1, math.ceil(wait_s))


class AbuseControls:
    def __init__(self, counters: Counters, settings: GatewaySettings) -> None:
        self._counters, self._s = counters, settings

    def _key_budget(self, principal: Principal, route: RouteClass) -> list[Budget]:
        limit = {"verify": self._s.rate_verify_per_key, "identify": self._s.rate_identify_per_key,
                 "enroll": self._s.rate_enroll_per_key}[route]
        return [Budget(f"key:{principal.key_prefix}:{route}", limit, self._s.rate_window_s)] if limit else []

    def admit(self, principal: Principal, route: RouteClass) -> None:
        """Spend one request of the key's budget for this route class, or raise a 429 problem."""
        budgets = self._key_budget(principal, route)
        wait = self._counters.take(budgets) if budgets else None
        if wait is not None:
            BUDGET_REFUSALS.labels(route=route, reason="rate-limited").inc()
            raise too_many_requests(f"this API key's {route} budget ({budgets[0].limit} per "
                                    f"{self._s.rate_window_s} s)", wait)

    def admit_verify(self, principal: Principal, subject_id: str) -> None:
        """Verify: refuse a locked subject (423), then spend the key's and the subject's budgets (429)."""
        locked = self._counters.flag_wait(_lock(principal, subject_id))
        if locked is not None:
            BUDGET_REFUSALS.labels(route="verify", reason="locked").inc()
            raise subject_locked(subject_id, locked)
        budgets = self._key_budget(principal, "verify")
        if self._s.subject_verify_limit:
            budgets.append(Budget(f"subject:{principal.tenant_id}:{subject_id}", self._s.subject_verify_limit,
                                  self._s.subject_verify_window_s))
        wait = self._counters.take(budgets) if budgets else None
        if wait is not None:
            BUDGET_REFUSALS.labels(route="verify", reason="rate-limited").inc()
            raise too_many_requests("the verify budget of this API key or of this subject", wait)

    def record_verify(self, principal: Principal, subject_id: str, match: bool) -> bool:
        """A match resets the subject's failures; a non-match counts one. True when this one locked it."""
        failures = _failures(principal, subject_id)
        if match:
            self._counters.clear(failures)
            return False
        if not self._s.lockout_failures:
            return False
        return self._counters.fail(failures, _lock(principal, subject_id), self._s.lockout_failures,
                                   self._s.lockout_window_s, self._s.lockout_s)

    def unlock(self, principal: Principal, subject_id: str) -> bool:
        """Admin: lift a lock-out and forget the failures; True when the subject was locked."""
        was_locked = self._counters.flag_wait(_lock(principal, subject_id)) is not None
        self._counters.clear(_lock(principal, subject_id), _failures(principal, subject_id))
        return was_locked


def _lock(principal: Principal, subject_id: str) -> str:
    return f"lock:{principal.tenant_id}:{subject_id}"


def _failures(principal: Principal, subject_id: str) -> str:
    return f"failures:{principal.tenant_id}:{subject_id}"
