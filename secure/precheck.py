"""Which match jobs the gateway prechecks: asks both parties, before the MPC job, whether they hold its snapshot.

The check (``POST /internal/match/check``, no shares) costs two of the four party calls of a verify and, at each
party, a copy of the snapshot's rows. It is there for one case: a party that cannot serve the snapshot (it lost a
committed decision, a delete erased rows of an older snapshot) refuses a match job at once, while its peer's job
waits in the peer's MPC queue for up to pair_wait_s for a partner that never comes, and every job behind it waits
too. In normal running the gateway's settled snapshot (``app/services/operations.py``) rules that out and the
check finds nothing (docs/operations.md "The precheck": +10% requests/s without it under load).

Modes: ``always`` checks before every job; ``after-refusal`` checks a gallery's first job from this process and
any job after one that did not run at both parties (refused, unavailable, cancelled). Whether a check is sent
depends on whether the last job ran, never on what it decided: a match and a non-match leave the same state.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

PrecheckMode = Literal["always", "after-refusal"]
PRECHECK_MODES: tuple[PrecheckMode, ...] = ("always", "after-refusal")


class PrecheckPolicy:
    """The mode and, for ``after-refusal``, the galleries whose last job ran at both parties (per process)."""

    def __init__(self, mode: PrecheckMode | bool, on_sent: Callable[[], None] | None = None) -> None:
        """``mode``: a ``PRECHECK_MODES`` value; True is ``always``; False never checks (tests only).
        ``on_sent``: called for each check sent (the gateway counts them in a metric; ``secure`` imports no ``app``)."""
        resolved = "always" if mode is True else (mode or None)
        if resolved not in (None, *PRECHECK_MODES):
            raise ValueError(f"precheck must be one of {PRECHECK_MODES}, True or False, not {mode!r}")
        self.mode: PrecheckMode | None = resolved
        self._in_sync: set[str] = set()
        self._on_sent = on_sent
        self.sent = 0  # checks this process sent (tests)

    def wanted(self, gallery: str) -> bool:
        """Whether to check before the next job on ``gallery``."""
        return self.mode == "always" or (self.mode == "after-refusal" and gallery not in self._in_sync)

    def count_sent(self) -> None:
        """A check is being sent."""
        self.sent += 1
        if self._on_sent is not None:
            self._on_sent()

    def ran(self, gallery: str) -> None:
        """The job ran at both parties, whatever it decided."""
        self._in_sync.add(gallery)

    def failed(self, gallery: str) -> None:
        """The job did not run at both parties: check before the next one on this gallery."""
        self._in_sync.discard(gallery)
