"""The Flower apps of the deployment runtime (SuperLink + SuperNodes), built from Flower's run and node configs.

Same ServerApp round loop and same ClientApp training as the simulation (server_app.run_rounds,
client_app.make_client_app); only where the settings and the photos come from differs:
- ServerApp: the run config (`[tool.flwr.app.config]` of flower_app/pyproject.toml, overridable with
  `flwr run ... --run-config`) gives rounds, nodes to wait for, clients per round, scope, aggregation, seed,
  held-out pairs, round timeout, and where to write the state and the report.
- ClientApp: the node config of its SuperNode (`flower-supernode --node-config`, set by
  `privface client federated join`) names the file of the owner's aligned faces on the device and the
  device's client id. The photos never leave the device's processes (SuperNode and its ClientApp).

The device draws its transform noise and augmentation from the OS (`secrets`): a seed sent by the server
is removed from every message before the training code sees it, so the server cannot choose the noise.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from inference.lfw import lfw_dir, shared_dir
from inference.transform import PRESETS, TransformSpec
from training_jobs.federated import checkpoint
from training_jobs.federated.client_app import make_client_app
from training_jobs.federated.heldout import Heldout
from training_jobs.federated.server_app import run_rounds
from training_jobs.federated.settings import AGGREGATIONS, ServerSettings

FACES_KEY = "faces"  # node config: path of a .npy of the owner's aligned faces, RGB uint8 [n, 112, 112, 3]
CLIENT_ID_KEY = "client-id"  # node config: the device's stable pseudonym (default: Flower's node id)


class NodeFaces:
    """Photo loader of a real device: the aligned faces its owner gave `privface client federated join`."""

    def __call__(self, context: Context) -> np.ndarray:
        if FACES_KEY not in context.node_config:
            raise ValueError(f"this SuperNode has no '{FACES_KEY}' in its node config (start it with "
                             "`privface client federated join`)")
        path = Path(str(context.node_config[FACES_KEY]))
        faces: np.ndarray = np.load(path, allow_pickle=False)
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (112, 112, 3) or not len(faces):
            raise ValueError(f"{path}: expected aligned faces uint8 [n, 112, 112, 3], got {faces.dtype} {faces.shape}")
        digest = hashlib.sha256(np.ascontiguousarray(faces).tobytes()).hexdigest()[:16]
        # a line in the device's own log (never sent): what this device trained on, checkable by its owner
        print(f"privface device {device_client_id(context)}: training on {len(faces)} photos "
              f"(faces sha256 {digest}) from {path}", file=sys.stderr, flush=True)
        return faces


def device_client_id(context: Context) -> str:
    """The id the server keys this device's class vector by: the device's own pseudonym when it set one (stable
    across restarts of its SuperNode), else Flower's node id."""
    chosen = context.node_config.get(CLIENT_ID_KEY)
    return f"device-{chosen}" if chosen else f"node-{context.node_id}"


def ignore_server_seed(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: drop any `seed` the server put in a config, so the device's noise comes from the OS."""
    for record in message.content.config_records.values():
        if "seed" in record:
            del record["seed"]
    return call_next(message, context)


def client_app(shared: Path | None = None) -> ClientApp:
    """The device's ClientApp: the project's ClientApp on the node's own faces, its noise from the OS."""
    return make_client_app(NodeFaces(), shared or shared_dir(), mods=[ignore_server_seed],
                           client_id_fn=device_client_id)


def settings_from_run_config(config: dict[str, Any], shared: Path) -> ServerSettings:
    """ServerSettings from Flower's run config (keys as in flower_app/pyproject.toml); bad values refused."""
    aggregation = str(config["aggregation"])
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
    scope = str(config["scope"])
    if scope not in ("whole", "adapter-tail"):
        raise ValueError(f"scope must be whole or adapter-tail, not {scope!r}")
    nodes, per_round = int(config["min-nodes"]), int(config["clients-per-round"])
    if not 1 <= per_round <= nodes:
        raise ValueError(f"clients-per-round must be 1..min-nodes ({nodes}), not {per_round}")
    spec = PRESETS[str(config["transform"])](float(config["epsilon"]))
    seed = int(config["seed"])
    timeout = float(config["round-timeout"])
    return ServerSettings(str(shared), spec.to_dict(), scope, int(config["num-rounds"]), per_round, nodes,
                          seed if seed >= 0 else None,
                          {"epochs": int(config["local-epochs"]), "batch-size": int(config["batch-size"])},
                          None, aggregation, {"timeout": timeout, "max_weight": int(config["max-weight"])},
                          0.0, str(config["state-dir"]) or None, round_timeout=timeout,
                          heldout_pairs_per_fold=int(config.get("heldout-pairs-per-fold", 0)))  # optional: 0


def write_report(path: Path, log_: dict[str, Any]) -> None:
    """The run's log (rounds, clients, bytes, times, held-out metrics) as JSON, written atomically."""
    report = {key: value for key, value in log_.items() if key != "final_arrays"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)


def server_app(shared: Path | None = None) -> ServerApp:
    """The ServerApp of a deployment: privface's round loop with the settings of Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        root = shared or shared_dir()
        settings = settings_from_run_config(dict(context.run_config), root)
        if settings.state_dir:  # before the report is touched: a refused duplicate leaves the directory as it is
            checkpoint.claim(Path(settings.state_dir), context.run_id)
        pairs = settings.heldout_pairs_per_fold
        spec = TransformSpec.from_dict(settings.transform)
        heldout = Heldout(lfw_dir(root), spec, pairs, seed=settings.seed or 0) if pairs > 0 else None
        out = str(context.run_config["report"])
        log_: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            run_rounds(grid, context, settings, heldout, log_)
        except Exception as error:  # the report says why the run stopped, then Flower marks the run failed
            log_["status"] = f"failed: {type(error).__name__}: {error}"
            raise
        finally:
            log_["wall_seconds"] = time.perf_counter() - start
            if out:
                write_report(Path(out), log_)

    return app
