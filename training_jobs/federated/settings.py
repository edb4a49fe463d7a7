"""The settings of one federated job, apart from the server that runs it.

Why a module of its own: the simulation, the deployment runtime and the gateway's job all build these settings,
and a saved round state is resumed only by a run whose settings have the same `identity()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from training_jobs.evaluate import DEFAULT_FOLDS

AGGREGATIONS = ("fedavg", "secagg+")
DEFAULT_PAIRS_PER_FOLD = 60


@dataclass
class ServerSettings:
    """One federated job: model scope, sampling, rounds, aggregation and the local training config sent to clients."""

    shared: str
    transform: dict[str, Any]
    scope: str = "adapter-tail"
    rounds: int = 3
    clients_per_round: int = 10
    num_clients: int = 10
    seed: int | None = 0
    local: dict[str, Any] = field(default_factory=lambda: {"epochs": 1, "batch-size": 4})
    eval_rounds: tuple[int, ...] | None = None  # rounds after which to evaluate (0 = before); None: 0 and last
    aggregation: str = "fedavg"
    secagg: dict[str, Any] = field(default_factory=dict)  # SecAggSettings fields
    drop_fraction: float = 0.0  # simulation: this share of each round's clients drops after key sharing
    state_dir: str | None = None  # round state (resume) and cancel request; None: neither
    round_timeout: float = 3600.0  # seconds to wait for a round's replies (deployment: devices that vanish)
    base_weights: str | None = None  # the starting model's state dict (params.base_weights_of); None: served v0
    base_sha256: str | None = None
    dp: dict[str, Any] = field(default_factory=dict)  # dp.DpSettings fields; empty: no DP
    faces: str | None = None  # simulation: the face set (LFW layout, pairs.txt) of clients and held-out; None: LFW
    heldout_folds: tuple[int, ...] = DEFAULT_FOLDS  # the face set's folds no client is drawn from
    # pairs per held-out fold of the evaluations the run's log records after its rounds (0: none per round, as in
    # the deployment runtime); part of the identity, so a resumed log never mixes two sample sizes
    heldout_pairs_per_fold: int = DEFAULT_PAIRS_PER_FOLD

    def __post_init__(self) -> None:
        self.heldout_folds = tuple(sorted(set(self.heldout_folds)))  # a list or another order is the same run
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {self.aggregation!r}")

    def identity(self) -> dict[str, Any]:
        """What determines the training (a saved state is only resumed by a run with the same identity)."""
        out = asdict(self)
        for key in ("state_dir", "eval_rounds", "round_timeout"):
            out.pop(key)
        if self.faces is None and self.heldout_folds == DEFAULT_FOLDS:  # LFW's population: states saved before
            out.pop("faces")                                              # these fields existed still resume
            out.pop("heldout_folds")
        # likewise for states saved before this field: the default, and 0 (the deployment runtime logs no held-out
        # metrics per round, so there is no sample size to mix)
        if self.heldout_pairs_per_fold in (0, DEFAULT_PAIRS_PER_FOLD):
            out.pop("heldout_pairs_per_fold")
        return out
