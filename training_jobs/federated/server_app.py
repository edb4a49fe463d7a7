"""The Flower ServerApp: FedFace rounds with FedAvg or SecAgg+ aggregation, resumable and cancellable (needs flwr).

`FedFaceAvg` is Flower's FedAvg with FedFace's additions:
- each sampled client also receives its own class vector (once the server has one) and returns it updated;
  class vectors are kept per client id (node ids change when processes restart), never averaged;
- after each round's aggregation the server applies the spread-out regulariser to all class vectors it holds;
- aggregation: Flower's weighted mean of the replies (`fedavg`), or SecAgg+ (`secagg+`, secagg.py: the server
  only ever sees the weighted mean). It logs per round: clients sampled/replied/failed, bytes each way, time.

Why privface's own round loop (`run_rounds`) instead of `Strategy.start`: it must (a) run SecAgg+, which Flower
1.41 offers only as a legacy workflow, (b) save the round state after every round (checkpoint.py) and start
from a saved round after a restart, with the same sampling as an uninterrupted run (sampling is seeded per
round), and (c) stop between rounds when the driving job asks (the cancel file in the state directory).
Held-out evaluation (LFW folds 6-10, never a client) runs after the rounds chosen in the settings.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from inference.frequency_model import FrequencyFaceModel
from inference.transform import TransformSpec
from training_jobs.federated import checkpoint
from training_jobs.federated.checkpoint import RoundState
from training_jobs.federated.client_app import CLASS_KEY
from training_jobs.federated.heldout import Heldout
from training_jobs.federated.params import build_base_model, get_arrays, set_arrays, travelling_names
from training_jobs.federated.secagg import SecAggSettings, run_secagg
from training_jobs.federated.settings import ServerSettings
from training_jobs.federated.spreadout import spread_out

METRIC_KEYS = ("loss", "identity", "distill", "impostor", "train-seconds", "clipped")


def record_bytes(record: ArrayRecord) -> int:
    """Serialised tensor bytes of an ArrayRecord (what one direction of one client's round carries)."""
    return int(sum(len(array.data) for array in record.values()))


def payload_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: tensor bytes of its arrays, byte strings and strings of its configs, 8 per
    number (message framing excluded). Counts what SecAgg+ adds too (keys, encrypted shares, masked vectors)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record_bytes(record)
            continue
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


class MeteredGrid:
    """The Grid, counting the payload bytes that go to and come back from the nodes (every SecAgg+ stage)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.down, self.up = grid, 0, 0
        self.exchanges: list[float] = []  # seconds of each send-and-receive (SecAgg+: one per protocol stage)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.down += sum(payload_bytes(m.content) for m in messages)
        start = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.exchanges.append(round(time.perf_counter() - start, 3))
        self.up += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def round_rng(seed: int | None, server_round: int) -> random.Random:
    """Sampling (and simulated dropouts) of one round: seeded per round, so a resumed run samples exactly as
    an uninterrupted one; from the OS when the run has no seed."""
    return random.Random(f"{seed}:{server_round}") if seed is not None else random.Random()


def wait_for_nodes(grid: Grid, count: int, wait_s: float = 600.0) -> list[int]:
    """The connected nodes, once at least `count` are (deployment: devices join over time)."""
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} nodes connected after {wait_s:.0f} s, need {count}")
        time.sleep(1.0)
    return nodes


class FedFaceAvg(FedAvg):
    """FedAvg + per-client class vectors + server-side spread-out (FedFace, supervised mode), with FedAvg or
    SecAgg+ rounds."""

    def __init__(self, spreadout_margin: float = 0.0, spreadout_lr: float = 0.1, spreadout_steps: int = 10,
                 seed: int | None = 0, drop_fraction: float = 0.0, secagg: SecAggSettings | None = None,
                 round_timeout: float = 3600.0, **fedavg: object) -> None:
        fedavg.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg)
        self.spreadout = (spreadout_margin, spreadout_lr, spreadout_steps)  # spread_out's margin, lr, steps
        self.seed, self.drop_fraction, self.round_timeout = seed, drop_fraction, round_timeout
        self.secagg = secagg or SecAggSettings()
        self.class_vectors: dict[str, np.ndarray] = {}  # client id -> class vector
        self.node_clients: dict[int, str] = {}  # node id -> client id, learned from replies
        self.rounds: list[dict[str, Any]] = []

    # --- sampling --------------------------------------------------------------------------------
    def sample(self, grid: Grid, server_round: int) -> tuple[list[int], set[int]]:
        """This round's nodes and, in simulation with `drop_fraction`, the ones told to drop mid-round.

        Sampling is over client ids, not node ids: node ids are drawn afresh whenever the processes start, so
        only client ids make a restarted run sample as the uninterrupted one would have."""
        rng = round_rng(self.seed, server_round)
        nodes = wait_for_nodes(grid, self.min_available_nodes)
        unknown = [node for node in nodes if node not in self.node_clients]
        if unknown:
            self.identify(grid, unknown)
        by_client = {self.node_clients[node]: node for node in nodes if node in self.node_clients}
        count = min(len(by_client), max(int(len(nodes) * self.fraction_train), self.min_train_nodes))
        chosen = [by_client[client] for client in rng.sample(sorted(by_client), count)]
        dropped = set(rng.sample(chosen, round(self.drop_fraction * len(chosen)))) if self.drop_fraction else set()
        return chosen, dropped

    def class_vector_of(self, node: int) -> np.ndarray | None:
        client = self.node_clients.get(node)
        return self.class_vectors.get(client) if client is not None else None

    def identify(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes for their client id (one small query each): the server samples by client id and keeps
        class vectors by client id, and a new (or restarted) node's id says nothing about its client."""
        messages = [Message(RecordDict({"config": ConfigRecord({"what": "client-id"})}), dst_node_id=node,
                            message_type=MessageType.QUERY) for node in nodes]
        for reply in grid.send_and_receive(messages, timeout=self.round_timeout):
            if not reply.has_error():
                self.node_clients[reply.metadata.src_node_id] = str(reply.content["client"]["client-id"])

    # --- FedAvg round (message API) --------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """Seeded sampling, then one message per node with its own class vector (and a drop flag in simulation)."""
        nodes, dropped = self.sample(grid, server_round)
        messages = []
        for node in nodes:
            node_config = ConfigRecord({**config, "server-round": server_round, **({"drop": True} if node in dropped else {})})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            vector = self.class_vector_of(node)
            if vector is not None:
                record["class"] = ArrayRecord({CLASS_KEY: Array(vector)})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the model parameters (class vectors set aside), then spread-out on the class vectors."""
        valid, failed = self._check_and_log_replies(list(replies), is_train=True)
        arrays, metrics = None, None
        if valid:
            contents = [self.split_class_vector(message) for message in valid]
            arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
            self.apply_spreadout()
        return arrays, metrics

    def split_class_vector(self, message: Message) -> RecordDict:
        """Keep the reply's class vector (per client) and return the content with only the model parameters."""
        record = message.content[self.arrayrecord_key]
        node = message.metadata.src_node_id
        client_record = message.content.get("client")
        client = str(client_record["client-id"]) if client_record is not None else f"node-{node}"
        self.node_clients[node] = client
        if CLASS_KEY in record:  # none in the unsupervised mode
            self.class_vectors[client] = record[CLASS_KEY].numpy()
        model = ArrayRecord({key: value for key, value in record.items() if key != CLASS_KEY})
        metrics = next(iter(message.content.metric_records.values()))
        return RecordDict({self.arrayrecord_key: model, "metrics": metrics})

    def fedavg_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, dict[str, Any]]:
        start = time.perf_counter()
        metered = MeteredGrid(grid)
        messages = self.configure_train(server_round, arrays, config, grid)
        replies = metered.send_and_receive(messages, timeout=self.round_timeout)
        new, metrics = self.aggregate_train(server_round, replies)
        valid = [r for r in replies if not r.has_error()]
        entry = {"round": server_round, "aggregation": "fedavg", "sampled": len(messages), "replied": len(valid),
                 "failed": len(messages) - len(valid),
                 "bytes_down_per_client": metered.down // max(1, len(messages)),
                 "bytes_up_per_client": metered.up // max(1, len(valid)),
                 "replied_clients": sorted(self.node_clients[r.metadata.src_node_id] for r in valid),
                 "train_seconds": time.perf_counter() - start, "metrics": dict(metrics) if metrics else None}
        return (new if new is not None else arrays), entry

    # --- SecAgg+ round (Flower's SecAggPlusWorkflow) ----------------------------------------------
    def secagg_round(self, grid: Grid, context: Context, server_round: int, arrays: ArrayRecord,
                     config: ConfigRecord) -> tuple[ArrayRecord, dict[str, Any]]:
        """Clients reply masked updates (local - global); the server sees only their weighted mean, adds it to
        the global parameters. Class vectors and losses come back in clear, per client (spread-out needs them)."""
        start = time.perf_counter()
        names = list(arrays.keys())
        globals_ = [arrays[name].numpy() for name in names]
        parameters = ndarrays_to_parameters(globals_)
        nodes, dropped = self.sample(grid, server_round)
        base = {**config, "server-round": server_round, "names": json.dumps(names),
                "clipping-range": float(self.secagg.clipping_range), "max-weight": int(self.secagg.max_weight)}
        fitins = {}
        for node in nodes:
            node_config = dict(base, **({"drop": True} if node in dropped else {}))
            vector = self.class_vector_of(node)
            if vector is not None:
                node_config["class-vector"] = vector.astype(np.float32).tobytes()
            fitins[node] = FitIns(parameters, node_config)
        metered = MeteredGrid(grid)
        outcome = run_secagg(metered, context, server_round, fitins, self.secagg)
        metrics = None
        if outcome.mean is not None:
            arrays = ArrayRecord({name: Array((g + m).astype(np.float32)) for name, g, m in zip(names, globals_, outcome.mean)})
            weights = np.array([res.num_examples for _, res in outcome.results], dtype=np.float64)
            metrics = {key: float(np.average([float(res.metrics[key]) for _, res in outcome.results], weights=weights))
                       for key in METRIC_KEYS if all(key in res.metrics for _, res in outcome.results)}
            for node, res in outcome.results:
                client = str(res.metrics["client-id"])
                self.node_clients[node] = client
                if "class-vector" in res.metrics:
                    self.class_vectors[client] = np.frombuffer(res.metrics["class-vector"], dtype=np.float32).copy()
            self.apply_spreadout()
        entry = {"round": server_round, "aggregation": "secagg+", "sampled": len(nodes),
                 "replied": len(outcome.results), "failed": outcome.failures,
                 "bytes_down_per_client": metered.down // max(1, len(nodes)),
                 "bytes_up_per_client": metered.up // max(1, len(outcome.results)),
                 "replied_clients": sorted(str(res.metrics["client-id"]) for _, res in outcome.results),
                 "secagg": {"shares": outcome.shares, "threshold": outcome.threshold, "halted": outcome.mean is None,
                            "stage_seconds": metered.exchanges},
                 "train_seconds": time.perf_counter() - start, "metrics": metrics}
        return arrays, entry

    def apply_spreadout(self) -> None:
        clients = sorted(self.class_vectors)
        if len(clients) < 2:  # unsupervised mode: no class vectors
            return
        spread = spread_out(np.stack([self.class_vectors[c] for c in clients]), *self.spreadout)
        self.class_vectors = {client: spread[i] for i, client in enumerate(clients)}


def base_model(settings: ServerSettings) -> FrequencyFaceModel:
    """The model the rounds start from (the base version's weights, or the served v0)."""
    return build_base_model(TransformSpec.from_dict(settings.transform), Path(settings.shared),
                            settings.base_weights, settings.base_sha256)


def initial_arrays(settings: ServerSettings) -> ArrayRecord:
    arrays = get_arrays(model := base_model(settings), travelling_names(model, settings.scope))
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


RoundCallback = Callable[..., None]  # (round, entry or None for round 0, held-out metrics or None, replayed=False)


class HeldoutEvaluator:
    """Held-out metrics of the global model after the chosen rounds (0 = before training)."""

    def __init__(self, settings: ServerSettings, heldout: Heldout | None) -> None:
        self.heldout = heldout
        self.rounds = settings.eval_rounds if settings.eval_rounds is not None else (0, settings.rounds)
        self.model = base_model(settings) if heldout is not None else None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        if self.heldout is None or self.model is None or server_round not in self.rounds:  # both None or neither
            return None
        set_arrays(self.model, {name: array.numpy() for name, array in arrays.items()})
        return self.heldout.evaluate(self.model, f"round {server_round}")


def run_rounds(grid: Grid, context: Context, settings: ServerSettings, heldout: Heldout | None, log: dict[str, Any],
               on_round: RoundCallback | None = None) -> None:
    """The whole run: start (or resume from the state directory), rounds, held-out evaluation, checkpoints,
    cancellation between rounds. Fills `log` (rounds, held-out, final arrays, class vectors, status)."""
    options: dict[str, Any] = dict(fraction_train=settings.clients_per_round / settings.num_clients,
                   min_train_nodes=settings.clients_per_round, min_available_nodes=settings.num_clients,
                   seed=settings.seed, drop_fraction=settings.drop_fraction, secagg=SecAggSettings(**settings.secagg),
                   round_timeout=settings.round_timeout)
    config = {"transform": json.dumps(TransformSpec.from_dict(settings.transform).to_dict()), **settings.local}
    if settings.dp:  # clipped updates + CSPRNG Gaussian noise (dp.py, dp_strategy.py)
        from training_jobs.federated.dp import DpSettings
        from training_jobs.federated.dp_strategy import DpFedFaceAvg
        strategy: FedFaceAvg = DpFedFaceAvg(DpSettings(**settings.dp), settings.clients_per_round /
                                            settings.num_clients, **options)
        config["dp-clip"] = float(settings.dp["clip"])
    else:
        strategy = FedFaceAvg(**options)
    if settings.seed is not None:
        config["seed"] = settings.seed
    if settings.base_weights:  # clients start from the same model: frozen parameters and BatchNorm statistics
        config.update({"base-weights": settings.base_weights, "base-sha256": settings.base_sha256 or ""})
    train_config = ConfigRecord(config)
    evaluate = HeldoutEvaluator(settings, heldout)
    state_dir = Path(settings.state_dir) if settings.state_dir else None
    fingerprint = checkpoint.fingerprint(settings.identity())
    state = checkpoint.load(state_dir, fingerprint) if state_dir else None
    start = time.perf_counter()
    if state is None:
        arrays = initial_arrays(settings)
        state = RoundState(0, {k: v.numpy() for k, v in arrays.items()}, {}, {"rounds": [], "heldout": {}}, fingerprint)
        metrics = evaluate(0, arrays)
        if metrics is not None:
            state.log["heldout"]["0"] = metrics
        if state_dir:
            checkpoint.save(state_dir, state)
        if on_round:
            on_round(0, None, metrics)
    else:
        arrays = ArrayRecord({k: Array(v) for k, v in state.arrays.items()})
        strategy.class_vectors = dict(state.class_vectors)
        state.log.setdefault("resumed", []).append({"from_round": state.round})
        if on_round:  # replay the saved rounds, so whoever follows the run sees all of them
            on_round(0, None, state.log["heldout"].get("0"), replayed=True)
            for entry in state.log["rounds"]:
                on_round(entry["round"], entry, state.log["heldout"].get(str(entry["round"])), replayed=True)
    status = "finished"
    for server_round in range(state.round + 1, settings.rounds + 1):
        if state_dir and checkpoint.cancel_path(state_dir).exists():
            status = "cancelled"
            break
        if settings.aggregation == "secagg+":
            arrays, entry = strategy.secagg_round(grid, context, server_round, arrays, train_config)
        else:
            arrays, entry = strategy.fedavg_round(grid, server_round, arrays, train_config)
        metrics = evaluate(server_round, arrays)
        state.log["rounds"].append(entry)
        if metrics is not None:
            state.log["heldout"][str(server_round)] = metrics
        state = RoundState(server_round, {k: v.numpy() for k, v in arrays.items()}, strategy.class_vectors,
                           state.log, fingerprint)
        if state_dir:
            checkpoint.save(state_dir, state)
        if on_round:
            on_round(server_round, entry, metrics)
    log.update(state.log)
    log["status"] = status
    log["last_round"] = state.round
    log["seconds"] = time.perf_counter() - start
    log["settings"] = {**settings.identity(), "transform": TransformSpec.from_dict(settings.transform).transform_id}
    log["final_arrays"] = {name: array.numpy() for name, array in arrays.items()}
    log["class_vectors"] = len(strategy.class_vectors)


def make_server_app(settings: ServerSettings, heldout: Heldout | None, log: dict[str, Any],
                    on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp that runs `run_rounds`. `on_round(round, that round's log entry or None for round 0,
    held-out metrics or None)` is called as each round ends, after its state is saved (live progress)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, context, settings, heldout, log, on_round)

    return app
