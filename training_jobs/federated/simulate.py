"""Federated retraining in Flower's simulation engine on this machine (needs flwr[simulation]).

    .venv-federated/bin/python -m training_jobs.federated.simulate --clients 60 --per-round 15 --rounds 3 \
        --scope adapter-tail --pairs-per-fold 60 --out docs/results/federated_sim.json

With --state-dir the run saves its state after every round and, started again with the same arguments and
directory, resumes after the last saved round; creating `<state-dir>/cancel` stops it between rounds.

Clients = LFW training identities (outside folds 6-10) with >= 2 photos, each seeing only its own photos
(`population`); held-out evaluation on folds 6-10 pairs before and after, same pairs and noise draws. With
--faces DIR (a face set in LFW's layout, e.g. `training_jobs.validation_set build`'s CelebA people) the clients
are that set's people outside --heldout-folds and the held-out pairs are those folds' pairs: new users' devices,
whose photos the served model never saw.
One Ray actor with one torch thread runs the clients one after another (2-core shared machine); --actors N
runs N in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.simulation import run_simulation

from inference.lfw import lfw_dir, load_many, shared_dir
from inference.metadata import ModelMetadata
from inference.operating_points import CALIBRATION_IMAGES, MIN_CALIBRATION_IMAGES
from inference.runtime import OrtEmbedder
from inference.transform import PRESETS, TransformSpec
from training_jobs.evaluate import DEFAULT_FOLDS, parse_folds
from training_jobs.federated import checkpoint
from training_jobs.federated.client_app import make_client_app
from training_jobs.federated.heldout import Heldout
from training_jobs.federated.impostors import DEFAULT_CHECKPOINT, NEGATIVES, file_sha256
from training_jobs.federated.local import MODES, LocalConfig
from training_jobs.federated.params import saved_weights, set_arrays
from training_jobs.federated.population import IsolationError, Population, make_population
from training_jobs.federated.secagg import SecAggSettings
from training_jobs.federated.server_app import RoundCallback, base_model, make_server_app
from training_jobs.federated.settings import AGGREGATIONS, DEFAULT_PAIRS_PER_FOLD, ServerSettings

BACKEND: dict[str, dict[str, object]] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"num_cpus": 1, "num_gpus": 0, "logging_level": "error", "log_to_driver": False}}


def backend(actors: int = 1) -> dict[str, Any]:
    """Ray backend with `actors` ClientApp actors (one CPU and one torch thread each) training clients in
    parallel; one by default (tests, and a machine shared with other work)."""
    return {**BACKEND, "init_args": {**BACKEND["init_args"], "num_cpus": actors}}


class PopulationPhotos:
    """Photo loader of a simulated node: its own identity's photos, checked, and nothing else."""

    def __init__(self, population: Population, faces: Path) -> None:
        self.population = population
        self.faces = faces

    def __call__(self, context: Context) -> np.ndarray:
        data = self.population.client(int(context.node_config["partition-id"]))
        if len(self.population.clients) != int(context.node_config["num-partitions"]):
            raise IsolationError("node partitions and clients differ")
        return load_many(self.faces, list(data.images))


PARENT_ENV = "PRIVFACE_FEDERATED_PARENT"


def die_with_parent(parent: int, period: float = 1.0) -> threading.Thread:
    """Kill this process group (this run and its Ray processes) once `parent` is no longer our parent.

    Why: the driving job starts the run in its own process group, so a signal to the job's group (Ctrl+C) does
    not tear it down half-way; but when the job's process dies (worker killed), nothing else would stop the run,
    and a resumed attempt would then race a stale one on the same state directory."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        if os.getpgrp() == os.getpid():  # leader of our own group: Ray's processes are in it too
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="die-with-parent", daemon=True)
    thread.start()
    return thread


def print_event(event: str, **fields: object) -> None:
    """One JSON line on stdout: how a driving job (app/services/federated_job.py) follows the run."""
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


def progress_printer(total: int) -> RoundCallback:
    """on_round callback of the ServerApp: one `round` event per finished round (round 0 = before training)."""
    def on_round(server_round: int, entry: dict[str, Any] | None, heldout: dict[str, Any] | None, replayed: bool = False) -> None:
        entry = entry or {}
        print_event("round", round=server_round, of=total, sampled=entry.get("sampled", 0),
                    finished=entry.get("replied", 0), failed=entry.get("failed", 0),
                    train_seconds=entry.get("train_seconds"), metrics=entry.get("metrics"), heldout=heldout,
                    aggregation=entry.get("aggregation"), dp=entry.get("dp"), replayed=replayed)
    return on_round


def simulate(population: Population, settings: ServerSettings, faces: Path, heldout: Heldout | None,
             on_round: RoundCallback | None = None, actors: int = 1) -> dict[str, Any]:
    """Run the rounds; returns the server's log (rounds, bytes, times, held-out metrics, final arrays)."""
    if heldout is not None and {c.identity for c in population.clients} & heldout.identities:
        raise IsolationError("a client is a held-out identity")
    if settings.state_dir:  # a state saved by other settings is refused before anything starts
        checkpoint.load(Path(settings.state_dir), checkpoint.fingerprint(settings.identity()))
    random.seed(settings.seed)  # SecAgg+ shuffles its neighbour graph with `random`; reproducible runs
    log: dict[str, Any] = {}
    client_app = make_client_app(PopulationPhotos(population, faces), Path(settings.shared))
    server_app = make_server_app(settings, heldout, log, on_round)
    start = time.perf_counter()
    run_simulation(server_app, client_app, num_supernodes=len(population.clients), backend_config=backend(actors))
    log["wall_seconds"] = time.perf_counter() - start
    if "status" not in log:
        raise RuntimeError("the simulation ended without finishing its rounds (see Flower's log above)")
    empty = [r["round"] for r in log.get("rounds", []) if not r.get("replied")]
    if empty:  # e.g. Ray killed every ClientApp actor (its memory monitor): the model did not train
        raise RuntimeError(f"no client replied in round(s) {empty} (see Flower's log above)")
    return log


def baseline_metrics(version_dir: Path, heldout: Heldout, state_dir: Path | None = None) -> dict[str, Any]:
    """Held-out metrics of a served model version (its ONNX file), on the same pairs and noise draws; kept in
    the state directory so a resumed run does not measure it again."""
    cached = state_dir / "baseline.json" if state_dir else None
    meta = ModelMetadata.load(version_dir, verify=True)
    key = {"version": meta.version, "sha256": meta.sha256, "heldout": heldout.fingerprint()}
    if cached is not None and cached.exists():  # measured on other pairs or another model: measured again
        saved: dict[str, Any] = json.loads(cached.read_text())
        if saved.get("measured_on") == key:
            return dict(saved["metrics"])
    features_fn = OrtEmbedder(version_dir / meta.onnx_file, prefer_gpu=True, intra_op_threads=1).embed
    metrics = {"version": meta.version, **heldout.evaluate_features_fn(features_fn, f"baseline {meta.version}")}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"measured_on": key, "metrics": metrics}))
    return metrics


def export_candidate(log: dict[str, Any], settings: ServerSettings, out_dir: Path, version: str, metrics: dict[str, Any],
                     calibration_images: int = CALIBRATION_IMAGES, calibration_faces: Path | None = None) -> Path:
    """The final global model as a served model version (ONNX + model.json + its PyTorch weights, so a later
    job can start from it); served threshold calibrated on people in no View-2 fold, or on ``calibration_faces``'s
    people (threshold None), never on the held-out pairs."""
    from inference.export import export_model_version

    spec = TransformSpec.from_dict(settings.transform)
    model = base_model(settings)
    set_arrays(model, log["final_arrays"])
    return export_model_version(model, spec, version, out_dir, Path(settings.shared), None, metrics,
                                calibration_images, calibration_faces)


def mode_config(mode: str, negatives: str, checkpoint_path: Path) -> dict[str, Any]:
    """The round-config entries of the learning mode and the impostor negatives (the generator file and its
    sha256, which each device checks; on real devices the same ~0.3 MB file is downloaded once)."""
    config: dict[str, Any] = {"mode": mode, "negatives": negatives}
    if negatives == "gan":
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"no impostor generator at {checkpoint_path}: run "
                                    "python -m training_jobs.federated.train_impostors")
        config.update({"impostor-path": str(checkpoint_path.resolve()),
                       "impostor-sha256": file_sha256(checkpoint_path)})
    return config


def mixup_config(args: argparse.Namespace) -> dict[str, Any]:
    """The MixUp keys of the clients' local config (none when off, so runs without MixUp keep their
    settings fingerprint and resume their saved states)."""
    if not args.mixup_k:
        return {}
    if args.mixup_k < 2:
        raise SystemExit("--mixup-k must be 0 (off) or >= 2")
    return {"mixup-k": args.mixup_k, "mixup-adaptive": bool(args.mixup_adaptive)}


def learning_rate_config(args: argparse.Namespace) -> dict[str, Any]:
    """The learning-rate keys of the clients' local config, only those given (so runs at the defaults keep
    their settings fingerprint and resume their saved states)."""
    given = {"lr": args.lr, "adapter-lr": args.adapter_lr}
    return {key: value for key, value in given.items() if value is not None}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--per-round", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scope", default="adapter-tail", choices=("whole", "adapter-tail"))
    parser.add_argument("--aggregation", default="fedavg", choices=AGGREGATIONS)
    parser.add_argument("--secagg-clip", type=float, default=SecAggSettings.clipping_range,
                        help="SecAgg+: updates are clipped to +-this before quantisation")
    parser.add_argument("--drop-fraction", type=float, default=0.0,
                        help="simulation: this share of each round's clients drops mid-round (after key sharing)")
    parser.add_argument("--dp-clip", type=float, default=None,
                        help="DP (fedavg): clip each client's update to this L2 norm; server adds Gaussian noise")
    parser.add_argument("--dp-noise", type=float, default=0.0, help="DP: noise multiplier (std / clip on the sum)")
    parser.add_argument("--dp-delta", type=float, default=1e-5, help="DP: the delta (epsilon, delta) is reported at")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="save the round state here after every round; resume from it; stop on <dir>/cancel")
    parser.add_argument("--mode", default="supervised", choices=MODES,
                        help="unsupervised: no labels on the device (agreement of two views + distillation to the "
                             "round's global model); identities with a single photo take part too")
    parser.add_argument("--negatives", default="none", choices=NEGATIVES,
                        help="gan: devices use generated impostor features as negatives (train_impostors.py)")
    parser.add_argument("--impostor-checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="the impostor generator the round ships (with --negatives gan)")
    parser.add_argument("--max-images", type=int, default=4, help="photos per client at most")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"devices' learning rate of the backbone (default {LocalConfig.lr})")
    parser.add_argument("--adapter-lr", type=positive_float, default=None,
                        help=f"devices' learning rate of the adapter (default {LocalConfig.adapter_lr})")
    parser.add_argument("--pairs-per-fold", type=int, default=DEFAULT_PAIRS_PER_FOLD)
    parser.add_argument("--faces", type=face_set, default=None,
                        help="a face set in LFW's layout with its pairs.txt whose people are the clients and whose "
                             "--heldout-folds give the held-out pairs (default: the shared LFW)")
    parser.add_argument("--heldout-folds", type=parse_folds, default=DEFAULT_FOLDS,
                        help="folds of the face set no client is drawn from, evaluated before/after (default 6-10)")
    parser.add_argument("--epsilon", type=float, default=64.0, help="served noise, per coefficient")
    parser.add_argument("--transform", default="dct8-v0", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixup-k", type=int, default=0,
                        help=">= 2: devices train on mixes of k of their feature maps (mixup.py); 0: off")
    parser.add_argument("--mixup-adaptive", action="store_true",
                        help="MixUp weights from the adversarial strategy network (else floored Dirichlet)")
    parser.add_argument("--actors", type=int, default=1, help="Ray actors training clients in parallel (CPUs)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--progress", action="store_true",
                        help="print one JSON line per round and the result as one JSON line (for a driving job)")
    parser.add_argument("--heldout-every-round", action="store_true", help="held-out metrics after every round")
    parser.add_argument("--baseline-dir", type=Path, default=None,
                        help="a served model version directory: its transform is used and its held-out metrics "
                             "are measured on the same pairs (the publishing guardrail's baseline)")
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="a model version directory to start from (its transform and saved PyTorch weights); "
                             "default: the served v0 (or the baseline's transform)")
    parser.add_argument("--export-dir", type=Path, default=None, help="export the candidate under this directory")
    parser.add_argument("--version", default=None, help="the candidate's model version name (with --export-dir)")
    add_calibration_argument(parser)
    return parser


def add_calibration_argument(parser: argparse.ArgumentParser) -> None:
    """--calibration-images: the exported candidate's impostor curve is measured on this many images of people in
    no View-2 fold (the served threshold sits at its false-match rate 1e-3); --calibration-faces: on every person of
    this face folder instead, people no model here trained on (inference.operating_points.calibrate)."""
    parser.add_argument("--calibration-images", type=calibration_count, default=CALIBRATION_IMAGES,
                        help=f"images of the exported candidate's impostor curve (default {CALIBRATION_IMAGES})")
    parser.add_argument("--calibration-faces", type=face_folder, default=None,
                        help="calibrate on this face folder's people (none trained on) instead of LFW's no-fold people")


def face_folder(text: str) -> Path:
    """An existing folder (argparse turns the error into one usage line)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: not a folder")
    return path


def face_set(text: str) -> Path:
    """A folder with a pairs.txt (argparse turns the error into one usage line)."""
    path = Path(text)
    if not (path / "pairs.txt").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a face set: no pairs.txt in it")
    return path


def positive_float(text: str) -> float:
    """A float above 0 (argparse turns the ValueError into one usage line)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def calibration_count(text: str) -> int:
    """An int of at least MIN_CALIBRATION_IMAGES (argparse turns the ValueError into one usage line)."""
    count = int(text)
    if count < MIN_CALIBRATION_IMAGES:
        raise argparse.ArgumentTypeError(f"at least {MIN_CALIBRATION_IMAGES}, not {count}")
    return count


def server_settings(args: argparse.Namespace, shared: Path, spec: TransformSpec,
                    base: tuple[Path, str] | None) -> ServerSettings:
    """The job's settings from the command line; `base`: the starting model's (weights path, sha256), None for v0.
    Fields after state_dir go by name: the dataclass grows (round_timeout came before base_weights), and a
    positional argument would land in the wrong field."""
    return ServerSettings(str(shared), spec.to_dict(), args.scope, args.rounds, args.per_round, args.clients,
                          args.seed, {"epochs": args.epochs, "batch-size": 4,
                                      **mode_config(args.mode, args.negatives, args.impostor_checkpoint),
                                      **mixup_config(args), **learning_rate_config(args)},
                          tuple(range(args.rounds + 1)) if args.heldout_every_round else None,
                          args.aggregation, {"clipping_range": args.secagg_clip, "max_weight": args.max_images},
                          args.drop_fraction, str(args.state_dir) if args.state_dir else None,
                          base_weights=str(base[0]) if base else None, base_sha256=base[1] if base else None,
                          dp={"clip": args.dp_clip, "noise_multiplier": args.dp_noise, "delta": args.dp_delta}
                          if args.dp_clip is not None else {},
                          faces=str(args.faces.resolve()) if args.faces else None, heldout_folds=args.heldout_folds,
                          heldout_pairs_per_fold=args.pairs_per_fold)


def population_and_heldout(args: argparse.Namespace, faces: Path, spec: TransformSpec) -> tuple[Population, Heldout]:
    """The clients (the face set's people outside --heldout-folds, one identity each) and the held-out pairs of
    those folds: disjoint by construction, and `simulate` checks it again."""
    population = make_population(faces, args.clients, min_images=1 if args.mode == "unsupervised" else 2,
                                 max_images=args.max_images, eval_folds=args.heldout_folds)
    return population, Heldout(faces, spec, args.pairs_per_fold, seed=args.seed, folds=args.heldout_folds)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    if os.environ.get(PARENT_ENV):
        die_with_parent(int(os.environ[PARENT_ENV]))
    if args.dp_clip is not None and args.aggregation != "fedavg":
        parser.error("--dp-clip works with --aggregation fedavg only")
    if (args.export_dir is None) != (args.version is None):
        parser.error("--export-dir and --version go together")
    shared = shared_dir()
    faces = args.faces or lfw_dir(shared)
    spec_dir = args.base_dir or args.baseline_dir
    spec = (ModelMetadata.load(spec_dir, verify=False).spec if spec_dir else PRESETS[args.transform](args.epsilon))
    if args.base_dir and args.baseline_dir and ModelMetadata.load(args.baseline_dir, verify=False).spec != spec:
        parser.error("--base-dir and --baseline-dir serve different transforms")
    base = saved_weights(args.base_dir) if args.base_dir else None
    population, heldout = population_and_heldout(args, faces, spec)
    settings = server_settings(args, shared, spec, base)
    baseline = baseline_metrics(args.baseline_dir, heldout, args.state_dir) if args.baseline_dir else None
    log = simulate(population, settings, faces, heldout, progress_printer(args.rounds) if args.progress else None,
                   args.actors)
    report = {key: value for key, value in log.items() if key != "final_arrays"}
    report["population"] = {"clients": len(population.clients),
                            "photos": sum(len(c.images) for c in population.clients)}
    report["baseline"] = baseline
    report["dp"] = (log["rounds"][-1].get("dp") if log.get("rounds") else None) if settings.dp else None
    report["base"] = ModelMetadata.load(args.base_dir, verify=False).version if args.base_dir else "v0"
    if args.export_dir is not None and log["status"] == "finished":
        metrics = {"federated": {"heldout": log.get("heldout"), "baseline": baseline, "settings": report["settings"],
                                 "population": report["population"]}}
        report["exported"] = str(export_candidate(log, settings, args.export_dir, args.version, metrics,
                                                  args.calibration_images, args.calibration_faces))
    if args.progress:
        print_event("result", **report)
    else:
        print(json.dumps(report, indent=1, default=str))
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
