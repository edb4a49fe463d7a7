"""A party's Prometheus metrics: match jobs, the MPC cost of each, the gallery and the MPC link.

One registry per party app (not the process-wide default), so tests that build several apps in one process
get independent counters. Labels are bounded: a job's kind (verify/identify) and its HTTP status; a gallery's
model version (one per model; never the tenant part of a gallery's name). Never a job id, a subject, a share or a token.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUNDS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
BYTES_BUCKETS = tuple(float(4 ** k) for k in range(5, 16))  # 1 KiB .. 1 GiB


def rows_per_model(gallery_counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Live rows summed per model version. The gateway names a gallery `<model>/<tenant>/k<key version>`
    (app/services/templates.py); only the model part becomes a label: one per model, and no tenant id."""
    out: dict[str, int] = {}
    for gallery, counts in gallery_counts.items():
        model = gallery.split("/", 1)[0]
        out[model] = out.get(model, 0) + int(counts.get("rows", 0))
    return out


class PartyMetrics:
    """The party's metrics; `render(oplog, engine)` refreshes the gauges from live state and serializes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("privface_party_match_jobs", "Match jobs answered, by kind and HTTP status.",
                            ["kind", "status"], registry=r)
        self.job_seconds = Histogram("privface_party_match_duration_seconds", "Time to answer a match job.",
                                     ["kind", "status"], buckets=SECONDS_BUCKETS, registry=r)
        self.mpc_seconds = Histogram("privface_party_mpc_seconds", "MPC time of a job (engine stats, mpc_s).",
                                     ["kind"], buckets=SECONDS_BUCKETS, registry=r)
        self.mpc_rounds = Histogram("privface_party_mpc_rounds", "Communication rounds of a job (engine stats).",
                                    ["kind"], buckets=ROUNDS_BUCKETS, registry=r)
        self.mpc_bytes = Histogram("privface_party_mpc_bytes", "Bytes this party sent in a job (engine stats).",
                                   ["kind"], buckets=BYTES_BUCKETS, registry=r)
        self.gallery_rows = Gauge("privface_party_gallery_rows", "Live template rows per gallery (model version).",
                                  ["model_version"], registry=r)
        self.mpc_connected = Gauge("privface_party_mpc_connected", "1 when the MPC engine is connected to its "
                                   "peer and dealer.", registry=r)

    def observe_job(self, kind: str, status: int, seconds: float) -> None:
        self.jobs.labels(kind=kind, status=str(status)).inc()
        self.job_seconds.labels(kind=kind, status=str(status)).observe(seconds)

    def observe_mpc(self, kind: str, stats: dict[str, Any] | None) -> None:
        """The engine's per-job stats (secure/mpc/runtime/worker.py); absent for jobs that ran no MPC."""
        if not stats:
            return
        for key, histogram in (("mpc_s", self.mpc_seconds), ("rounds", self.mpc_rounds),
                               ("bytes", self.mpc_bytes)):
            value = stats.get(key)
            if isinstance(value, (int, float)):
                histogram.labels(kind=kind).observe(float(value))

    def render(self, gallery_counts: dict[str, dict[str, int]], engine_status: dict[str, Any]) -> tuple[bytes, str]:
        self.gallery_rows.clear()  # a version dropped from the gallery disappears from the scrape
        for version, rows in rows_per_model(gallery_counts).items():
            self.gallery_rows.labels(model_version=version).set(rows)
        self.mpc_connected.set(1 if engine_status.get("connected") else 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
