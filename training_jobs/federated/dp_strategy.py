"""FedFaceAvg with client-side clipping and server-side Gaussian noise, and its (ε, δ) per round (needs flwr).

The mechanism and what its accounting covers are in dp.py; the accountant in accountant.py. Chosen by
`ServerSettings.dp` (server_app.run_rounds); FedAvg rounds only (the job refuses dp with secagg+).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from training_jobs.federated.accountant import DpAccount
from training_jobs.federated.dp import DpSettings, add_noise
from training_jobs.federated.server_app import FedFaceAvg


class DpFedFaceAvg(FedFaceAvg):
    """Unweighted mean of clipped updates + CSPRNG Gaussian noise; no spread-out step (dp.py says why)."""

    def __init__(self, dp: DpSettings, sample_rate: float, **kwargs: Any) -> None:
        kwargs["spreadout_steps"] = 0
        super().__init__(**kwargs)
        self.dp = dp
        self.account = DpAccount(dp.noise_multiplier, dp.delta, sample_rate)
        self.noise_std: float | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        weights = {float(next(iter(r.content.metric_records.values()))["num-examples"])
                   for r in replies if not r.has_error()}
        if weights - {1.0}:  # a client that weighs itself more would move the mean past clip/n
            raise ValueError(f"dp rounds need every client's weight to be 1, got {sorted(weights)}")
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.noise_std = None
        if arrays is not None:
            replied = sum(1 for r in replies if not r.has_error())
            noised, self.noise_std = add_noise({k: v.numpy() for k, v in arrays.items()}, self.dp, replied)
            arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in noised.items()})
        return arrays, metrics

    def fedavg_round(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                     config: ConfigRecord) -> tuple[ArrayRecord, dict[str, Any]]:
        new, entry = super().fedavg_round(grid, server_round, arrays, config)
        entry["dp"] = {"clip": self.dp.clip, "noise_multiplier": self.dp.noise_multiplier,
                       "noise_std": self.noise_std, **self.account.after(server_round)}
        return new, entry


