"""The Flower ClientApp of a device: trains the served model on its owner's photos only (needs flwr).

A train message carries the global travelling parameters ("arrays"), the round's config ("config": the
served transform as JSON, local training knobs, a seed in simulation) and, once the server knows this
client, its class vector ("class"). The reply carries the updated travelling parameters plus the updated
class vector (key `CLASS_KEY` in the same ArrayRecord, as Flower's strategies expect one ArrayRecord) and a
MetricRecord with the FedAvg weight ("num-examples") and the local losses. Photos never leave the process.
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from inference.frequency_model import FrequencyFaceModel
from inference.mobilefacenet import MobileFaceNet, load_pretrained
from inference.transform import TransformSpec
from training_jobs.federated.local import LocalConfig, train_local
from training_jobs.federated.params import build_base_model, freeze_except, get_arrays, set_arrays

CLASS_KEY = "class-vector"
PhotoLoader = Callable[[Context], np.ndarray]  # context -> the owner's faces, RGB uint8 [n, 112, 112, 3]


@lru_cache(maxsize=2)
def _base(spec_json: str, shared: str) -> FrequencyFaceModel:
    return build_base_model(TransformSpec.from_dict(json.loads(spec_json)), Path(shared))


@lru_cache(maxsize=1)
def _teacher(shared: str) -> MobileFaceNet:
    return load_pretrained(Path(shared)).requires_grad_(False).eval()


def local_config(config: ConfigRecord) -> LocalConfig:
    """LocalConfig from the round's config (keys are the field names with '-' for '_'); unknown keys ignored."""
    values = {f.name: config[f.name.replace("_", "-")] for f in fields(LocalConfig)
              if f.name.replace("_", "-") in config}
    return LocalConfig(**values)


def round_rng(config: ConfigRecord, partition_id: int) -> np.random.Generator:
    """Seeded per (seed, round, client) in simulation (reproducible); from the OS CSPRNG on a real device."""
    if "seed" in config:
        return np.random.default_rng([int(config["seed"]), int(config["server-round"]), partition_id])
    return np.random.default_rng(secrets.randbits(128))


def train_round(content: RecordDict, faces: np.ndarray, shared: Path, partition_id: int = 0) -> RecordDict:
    """One client's round: load the global parameters, train locally, reply with parameters + class vector."""
    start = time.perf_counter()
    config = content["config"]
    spec_json = str(config["transform"])
    spec = TransformSpec.from_dict(json.loads(spec_json))
    model = copy.deepcopy(_base(spec_json, str(shared)))
    received = {name: array.numpy() for name, array in content["arrays"].items()}
    set_arrays(model, received)
    freeze_except(model, list(received))
    class_record = content.get("class")
    class_vector = class_record[CLASS_KEY].numpy() if class_record is not None else None
    result = train_local(model, _teacher(str(shared)), faces, spec, class_vector, local_config(config),
                         round_rng(config, partition_id))
    arrays = {name: Array(value) for name, value in get_arrays(model, list(received)).items()}
    arrays[CLASS_KEY] = Array(result.class_vector)
    metrics = MetricRecord({"num-examples": result.num_examples, "loss": result.loss, "identity": result.identity,
                            "distill": result.distill, "train-seconds": time.perf_counter() - start})
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics})


def make_client_app(load_photos: PhotoLoader, shared: Path, threads: int = 1) -> ClientApp:
    """A ClientApp whose every train call sees only what `load_photos` returns for its node (one identity)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        partition_id = int(context.node_config.get("partition-id", 0))
        faces = load_photos(context)
        return Message(train_round(message.content, faces, shared, partition_id), reply_to=message)

    return app
