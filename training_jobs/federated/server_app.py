"""The Flower ServerApp: FedAvg over the travelling parameters + FedFace's spread-out on class vectors (needs flwr).

`FedFaceAvg` is Flower's FedAvg with two additions:
- each sampled client also receives its own class vector (once the server has one for it) and returns it
  updated; class vectors are kept per node and never averaged;
- after each round's aggregation the server applies the spread-out regulariser to all class vectors it holds.
It also logs, per round: clients sampled / replied / failed, bytes per client each way, and the round time.
Held-out evaluation (LFW folds 6-10, never a client) runs through Flower's `evaluate_fn` hook.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from inference.transform import TransformSpec
from training_jobs.federated.client_app import CLASS_KEY
from training_jobs.federated.heldout import Heldout
from training_jobs.federated.params import build_base_model, get_arrays, set_arrays, travelling_names
from training_jobs.federated.spreadout import spread_out


def record_bytes(record: ArrayRecord) -> int:
    """Serialised tensor bytes of an ArrayRecord (what one direction of one client's round carries)."""
    return int(sum(len(array.data) for array in record.values()))


class FedFaceAvg(FedAvg):
    """FedAvg + per-client class vectors + server-side spread-out (FedFace, supervised mode)."""

    def __init__(self, spreadout_margin: float = 0.0, spreadout_lr: float = 0.1, spreadout_steps: int = 10,
                 **fedavg: object) -> None:
        fedavg.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg)
        self.spreadout = {"margin": spreadout_margin, "lr": spreadout_lr, "steps": spreadout_steps}
        self.class_vectors: dict[int, np.ndarray] = {}
        self.rounds: list[dict] = []
        self._round_start = time.perf_counter()
        self._down_bytes = 0
        self._sampled = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling, then one message per node with its own class vector added."""
        self._round_start = time.perf_counter()
        messages = []
        for message in super().configure_train(server_round, arrays, config, grid):
            node = message.metadata.dst_node_id
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            if node in self.class_vectors:
                record["class"] = ArrayRecord({CLASS_KEY: Array(self.class_vectors[node])})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        self._down_bytes = record_bytes(arrays)
        self._sampled = len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the model parameters (class vectors set aside), then spread-out on the class vectors."""
        replies = list(replies)
        valid, failed = self._check_and_log_replies(replies, is_train=True)
        arrays, metrics, up_bytes = None, None, 0
        if valid:
            contents = [self.split_class_vector(message) for message in valid]
            up_bytes = record_bytes(valid[0].content[self.arrayrecord_key])
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
            self.apply_spreadout()
        self.rounds.append({"round": server_round, "sampled": self._sampled, "replied": len(valid),
                            "failed": len(failed), "bytes_down_per_client": self._down_bytes,
                            "bytes_up_per_client": up_bytes, "train_seconds": time.perf_counter() - self._round_start,
                            "metrics": dict(metrics) if metrics is not None else None})
        return arrays, metrics

    def split_class_vector(self, message: Message) -> RecordDict:
        """Keep the reply's class vector (per node) and return the content with only the model parameters."""
        record = message.content[self.arrayrecord_key]
        self.class_vectors[message.metadata.src_node_id] = record[CLASS_KEY].numpy()
        model = ArrayRecord({key: value for key, value in record.items() if key != CLASS_KEY})
        metrics = next(iter(message.content.metric_records.values()))
        return RecordDict({self.arrayrecord_key: model, "metrics": metrics})

    def apply_spreadout(self) -> None:
        nodes = sorted(self.class_vectors)
        spread = spread_out(np.stack([self.class_vectors[n] for n in nodes]), **self.spreadout)
        self.class_vectors = {node: spread[i] for i, node in enumerate(nodes)}


@dataclass
class ServerSettings:
    """One federated job: model scope, sampling, rounds and the local training config sent to clients."""

    shared: str
    transform: dict
    scope: str = "adapter-tail"
    rounds: int = 3
    clients_per_round: int = 10
    num_clients: int = 10
    seed: int | None = 0
    local: dict = field(default_factory=lambda: {"epochs": 1, "batch-size": 4})
    eval_rounds: tuple[int, ...] | None = None  # rounds after which to evaluate (0 = before); None: 0 and last


def initial_arrays(settings: ServerSettings) -> ArrayRecord:
    spec = TransformSpec.from_dict(settings.transform)
    model = build_base_model(spec, Path(settings.shared))
    return ArrayRecord({k: Array(v) for k, v in get_arrays(model, travelling_names(model, settings.scope)).items()})


RoundCallback = Callable[[int, dict | None], None]


def make_evaluate_fn(settings: ServerSettings, heldout: Heldout | None, log: dict,
                     on_round: RoundCallback | None = None):
    """Flower evaluate_fn (called after every round): held-out metrics of the global model at the chosen rounds,
    then `on_round(round, held-out metrics or None)` so a caller can report progress as rounds finish."""
    spec = TransformSpec.from_dict(settings.transform)
    model = build_base_model(spec, Path(settings.shared)) if heldout is not None else None
    rounds = settings.eval_rounds if settings.eval_rounds is not None else (0, settings.rounds)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = None
        if heldout is not None and server_round in rounds:
            set_arrays(model, {name: array.numpy() for name, array in arrays.items()})
            metrics = heldout.evaluate(model, f"round {server_round}")
            log.setdefault("heldout", {})[server_round] = metrics
        if on_round is not None:
            on_round(server_round, metrics)
        if metrics is None:
            return None
        return MetricRecord({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    return evaluate


def make_server_app(settings: ServerSettings, heldout: Heldout | None, log: dict,
                    on_round: Callable[[int, dict | None, dict | None], None] | None = None) -> ServerApp:
    """A ServerApp that runs `settings.rounds` FedFaceAvg rounds and fills `log` (rounds, held-out, final arrays).

    `on_round(round, that round's log entry or None for round 0, held-out metrics or None)` is called as each
    round ends (after its held-out evaluation), for live progress."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedFaceAvg(fraction_train=settings.clients_per_round / settings.num_clients,
                              min_train_nodes=settings.clients_per_round,
                              min_available_nodes=settings.num_clients)
        config = {"transform": json.dumps(TransformSpec.from_dict(settings.transform).to_dict()), **settings.local}
        if settings.seed is not None:
            config["seed"] = settings.seed
        def round_ended(server_round: int, metrics: dict | None) -> None:
            if on_round is not None:
                entry = strategy.rounds[-1] if server_round > 0 and strategy.rounds else None
                on_round(server_round, entry, metrics)

        start = time.perf_counter()
        evaluate_fn = make_evaluate_fn(settings, heldout, log, round_ended) if heldout or on_round else None
        result = strategy.start(grid, initial_arrays(settings), num_rounds=settings.rounds,
                                train_config=ConfigRecord(config), evaluate_fn=evaluate_fn)
        log["rounds"] = strategy.rounds
        log["seconds"] = time.perf_counter() - start
        log["settings"] = {**asdict(settings), "transform": TransformSpec.from_dict(settings.transform).transform_id}
        log["final_arrays"] = {name: array.numpy() for name, array in result.arrays.items()}
        log["class_vectors"] = len(strategy.class_vectors)

    return app
