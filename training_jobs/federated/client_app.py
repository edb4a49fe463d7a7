"""The Flower ClientApp of a device: trains the served model on its owner's photos only (needs flwr).

Two message formats arrive at the same `train` handler, one per aggregation:
- FedAvg (message API): "arrays" (the global travelling parameters), "config" (the served transform as JSON,
  local training knobs, a seed in simulation) and, once the server knows this client, "class" (its class
  vector). The reply carries the updated parameters plus the updated class vector (key `CLASS_KEY` in the same
  ArrayRecord, as Flower's strategies expect one ArrayRecord), a MetricRecord with the FedAvg weight
  ("num-examples") and the local losses, and a ConfigRecord "client" with this client's id.
- SecAgg+ (Flower's secaggplus_mod, which speaks the legacy FitIns/FitRes records): the global parameters as
  an ordered list whose names are in the config, the class vector as bytes in the config. The reply's
  parameters are the UPDATE (local - global), which the mod masks; class vector, client id and losses go in
  the FitRes metrics, in clear (the server's spread-out step needs each client's class vector).
Photos never leave the process.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from inference.frequency_model import FrequencyFaceModel
from inference.mobilefacenet import MobileFaceNet, load_pretrained
from inference.transform import TransformSpec
from training_jobs.federated.impostors import source_from_config
from training_jobs.federated.dp import clip_update
from training_jobs.federated.local import LocalConfig, train_local
from training_jobs.federated.params import build_base_model, freeze_except, get_arrays, set_arrays
from training_jobs.federated.secagg import FITINS_PARAMETERS, secagg_if_requested

CLASS_KEY = "class-vector"
PhotoLoader = Callable[[Context], np.ndarray]  # context -> the owner's faces, RGB uint8 [n, 112, 112, 3]


class SimulatedDropout(RuntimeError):
    """Raised by a simulated client the server told to drop out of this round (tests and benchmarks only)."""


@lru_cache(maxsize=2)
def _base(spec_json: str, shared: str, weights: str | None = None,
          sha256: str | None = None) -> tuple[FrequencyFaceModel, dict[str, torch.Tensor]]:
    """The published model (the job's base version), built once per process, with a pristine copy of its
    parameters."""
    model = build_base_model(TransformSpec.from_dict(json.loads(spec_json)), Path(shared), weights, sha256 or None)
    return model, {name: p.detach().clone() for name, p in model.named_parameters()}


def fresh_model(spec_json: str, shared: str, weights: str | None = None, sha256: str | None = None
                ) -> FrequencyFaceModel:
    """The published model with every parameter back at its published value.

    Why not a deepcopy per client: copying the ~1M-parameter module object by object took a quarter of a
    simulated client's round; copying the parameter tensors back in place costs about a millisecond. BatchNorm
    statistics never change (clients train in eval mode), so the parameters are all there is to restore."""
    model, pristine = _base(spec_json, shared, weights, sha256)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(pristine[name])
    return model


@lru_cache(maxsize=1)
def _teacher(shared: str) -> MobileFaceNet:
    return load_pretrained(Path(shared)).requires_grad_(False).eval()


def local_config(config: Mapping[str, Any]) -> LocalConfig:
    """LocalConfig from the round's config (keys are the field names with '-' for '_'); unknown keys ignored."""
    values = {f.name: config[f.name.replace("_", "-")] for f in fields(LocalConfig)
              if f.name.replace("_", "-") in config}
    return LocalConfig(**values)


def round_rng(config: Mapping[str, Any], partition_id: int) -> np.random.Generator:
    """Seeded per (seed, round, client) in simulation (reproducible); from the OS CSPRNG on a real device."""
    if "seed" in config:
        return np.random.default_rng([int(config["seed"]), int(config["server-round"]), partition_id])
    return np.random.default_rng(secrets.randbits(128))


def client_id(context: Context) -> str:
    """How the server keys this client's class vector across rounds and across a restart of the run: the
    partition in simulation (stable), the node id on a real SuperNode."""
    if "partition-id" in context.node_config:
        return f"partition-{int(context.node_config['partition-id'])}"
    return f"node-{context.node_id}"


@dataclass
class LocalUpdate:
    arrays: dict[str, np.ndarray]  # the updated travelling parameters
    class_vector: np.ndarray | None  # None in the unsupervised mode
    metrics: dict[str, float]


def local_update(received: dict[str, np.ndarray], config: Mapping[str, Any], class_vector: np.ndarray | None,
                 faces: np.ndarray, shared: Path, partition_id: int) -> LocalUpdate:
    """Load the global parameters into the published model, train them on the owner's photos, return them."""
    if config.get("drop"):
        raise SimulatedDropout("this client was told to drop out of the round (simulation)")
    start = time.perf_counter()
    spec_json = str(config["transform"])
    spec = TransformSpec.from_dict(json.loads(spec_json))
    weights = str(config["base-weights"]) if config.get("base-weights") else None
    model = fresh_model(spec_json, str(shared), weights, str(config.get("base-sha256") or "") or None)
    set_arrays(model, received)
    freeze_except(model, list(received))
    result = train_local(model, _teacher(str(shared)), faces, spec, class_vector, local_config(config),
                         round_rng(config, partition_id), impostors=source_from_config(config, spec))
    metrics = {"num-examples": result.num_examples, "loss": result.loss, "identity": result.identity,
               "distill": result.distill, "impostor": result.impostor, "train-seconds": time.perf_counter() - start}
    return LocalUpdate(get_arrays(model, list(received)), result.class_vector, metrics)


def train_round(content: RecordDict, faces: np.ndarray, shared: Path, partition_id: int = 0,
                client: str = "partition-0") -> RecordDict:
    """One client's FedAvg round: reply with parameters + class vector, metrics and the client id."""
    received = {name: array.numpy() for name, array in content["arrays"].items()}
    class_record = content.get("class")
    class_vector = class_record[CLASS_KEY].numpy() if class_record is not None else None
    update = local_update(received, content["config"], class_vector, faces, shared, partition_id)
    if "dp-clip" in content["config"]:  # DP round: the update clipped in L2, every client weighs 1 (dp.py)
        clipped, norm = clip_update(update.arrays, received, float(content["config"]["dp-clip"]))
        update = LocalUpdate(clipped, update.class_vector, {**update.metrics, "num-examples": 1, "update-norm": norm})
    arrays = {name: Array(value) for name, value in update.arrays.items()}
    if update.class_vector is not None:
        arrays[CLASS_KEY] = Array(update.class_vector)
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(update.metrics),
                       "client": ConfigRecord({"client-id": client})})


def train_round_secagg(content: RecordDict, faces: np.ndarray, shared: Path, partition_id: int = 0,
                       client: str = "partition-0") -> RecordDict:
    """One client's SecAgg+ round (legacy FitIns in, FitRes out): the parameters replied are the update
    local - global, clipped to the server's range, weighted by min(photos, max-weight) (the quantiser's
    overflow bound); secaggplus_mod masks them before they leave."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = fitins.config
    names = json.loads(str(config["names"]))
    values = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(values):
        raise ValueError(f"{len(values)} arrays for {len(names)} parameter names")
    received = dict(zip(names, values))
    class_vector = (np.frombuffer(config["class-vector"], dtype=np.float32).copy()
                    if "class-vector" in config else None)
    update = local_update(received, config, class_vector, faces, shared, partition_id)
    deltas = [update.arrays[name] - received[name] for name in names]
    clip = float(config["clipping-range"])
    clipped = int(sum(int(np.count_nonzero(np.abs(d) > clip)) for d in deltas))
    weight = min(int(update.metrics["num-examples"]), int(config["max-weight"]))
    metrics = {**update.metrics, "num-examples": weight, "clipped": clipped, "client-id": client}
    if update.class_vector is not None:
        metrics["class-vector"] = update.class_vector.astype(np.float32).tobytes()
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.clip(d, -clip, clip) for d in deltas]),
                    weight, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def make_client_app(load_photos: PhotoLoader, shared: Path, threads: int = 1, mods: Sequence[Mod] = (),
                    client_id_fn: Callable[[Context], str] = client_id) -> ClientApp:
    """A ClientApp whose every train call sees only what `load_photos` returns for its node (one identity).
    SecAgg+ messages go through Flower's secaggplus_mod (with privface's CSPRNG masks); FedAvg ones do not.
    `mods` run first (a real device drops the server's seed: deploy.py); `client_id_fn` names the client."""
    app = ClientApp(mods=[*mods, secagg_if_requested])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        partition_id = int(context.node_config.get("partition-id", 0))
        faces = load_photos(context)
        run = train_round_secagg if FITINS_PARAMETERS in message.content.array_records else train_round
        return Message(run(message.content, faces, shared, partition_id, client_id_fn(context)), reply_to=message)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """The client id, asked by a restarted server to give each client its own class vector back."""
        return Message(RecordDict({"client": ConfigRecord({"client-id": client_id_fn(context)})}), reply_to=message)

    return app
