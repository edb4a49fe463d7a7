"""What a gallery's match jobs run at: the verify threshold and the identify schedule (gateway and party agree).

Why a schedule: identify reveals whether the BEST of N scores passes the threshold, so with one threshold the
false-match rate per search grows like 1 - (1 - FMR)^N. The schedule holds the false-positive identification
rate (FPIR, per search) at its target as N grows: for galleries of up to ``max_n`` rows the threshold is the one
whose per-comparison false-match rate is 1 - (1 - FPIR)^(1 / max_n) (``inference/operating_points.py``
calibrates it per model version). The party picks the entry from its own row count; nothing a caller sends
chooses it (``secure/party/thresholds.py`` records it once per gallery).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from secure.ranges import check_threshold

MAX_SCHEDULE = 32


@dataclass(frozen=True)
class GalleryPolicy:
    """``verify``: 1:1 threshold. ``identify``: ((max_n, threshold), ...) ascending in max_n; empty = ``verify``."""

    verify: float
    identify: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        check_threshold(self.verify)
        if len(self.identify) > MAX_SCHEDULE:
            raise ValueError(f"at most {MAX_SCHEDULE} identify thresholds")
        sizes = [int(n) for n, _ in self.identify]
        if any(n < 1 for n in sizes) or sizes != sorted(set(sizes)):
            raise ValueError("identify schedule: gallery sizes must be positive and strictly increasing")
        for _, t in self.identify:
            check_threshold(t)

    def identify_threshold(self, n: int) -> float:
        """The threshold for a gallery of ``n`` rows: the first entry whose max_n >= n (the last one beyond)."""
        for max_n, t in self.identify:
            if n <= max_n:
                return float(t)
        return float(self.identify[-1][1]) if self.identify else float(self.verify)

    def threshold(self, kind: str, n: int) -> float:
        return self.verify if kind == "verify" else self.identify_threshold(n)

    @classmethod
    def of(cls, value: GalleryPolicy | float) -> GalleryPolicy:
        """A policy from a policy or a bare threshold (one threshold for both kinds)."""
        return value if isinstance(value, GalleryPolicy) else cls(float(value))

    def schedule_json(self) -> list[list[float]]:
        return [[int(n), float(t)] for n, t in self.identify]

    @classmethod
    def from_json(cls, verify: float, schedule: Sequence[Sequence[float]] | None) -> GalleryPolicy:
        return cls(float(verify), tuple((int(n), float(t)) for n, t in (schedule or [])))
