"""Federated retraining in Flower's simulation engine on this machine (needs flwr[simulation]).

    .venv-federated/bin/python -m training_jobs.federated.simulate --clients 60 --per-round 15 --rounds 3 \
        --scope adapter-tail --pairs-per-fold 60 --out docs/results/federated_sim.json

Clients = LFW training identities (outside folds 6-10) with >= 2 photos, each seeing only its own photos
(`population`); held-out evaluation on folds 6-10 pairs before and after, same pairs and noise draws.
One Ray actor with one torch thread runs the clients one after another (2-core shared machine).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.simulation import run_simulation

from inference.lfw import lfw_dir, load_many, shared_dir
from inference.transform import PRESETS
from training_jobs.federated.client_app import make_client_app
from training_jobs.federated.heldout import Heldout
from training_jobs.federated.population import IsolationError, Population, make_population
from training_jobs.federated.server_app import ServerSettings, make_server_app

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
           "init_args": {"num_cpus": 1, "num_gpus": 0, "logging_level": "error", "log_to_driver": False}}


class PopulationPhotos:
    """Photo loader of a simulated node: its own identity's photos, checked, and nothing else."""

    def __init__(self, population: Population, lfw: Path) -> None:
        self.population = population
        self.lfw = lfw

    def __call__(self, context: Context) -> np.ndarray:
        data = self.population.client(int(context.node_config["partition-id"]))
        if len(self.population.clients) != int(context.node_config["num-partitions"]):
            raise IsolationError("node partitions and clients differ")
        return load_many(self.lfw, list(data.images))


def simulate(population: Population, settings: ServerSettings, lfw: Path, heldout: Heldout | None) -> dict:
    """Run the rounds; returns the server's log (rounds, bytes, times, held-out metrics, final arrays)."""
    if heldout is not None and {c.identity for c in population.clients} & heldout.identities:
        raise IsolationError("a client is a held-out identity")
    random.seed(settings.seed)  # Flower samples clients with `random`; reproducible runs
    log: dict = {}
    client_app = make_client_app(PopulationPhotos(population, lfw), Path(settings.shared))
    server_app = make_server_app(settings, heldout, log)
    start = time.perf_counter()
    run_simulation(server_app, client_app, num_supernodes=len(population.clients), backend_config=BACKEND)
    log["wall_seconds"] = time.perf_counter() - start
    if "rounds" not in log:
        raise RuntimeError("the simulation ended without finishing its rounds (see Flower's log above)")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--per-round", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scope", default="adapter-tail", choices=("whole", "adapter-tail"))
    parser.add_argument("--max-images", type=int, default=4, help="photos per client at most")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--pairs-per-fold", type=int, default=60)
    parser.add_argument("--epsilon", type=float, default=64.0, help="served noise, per coefficient")
    parser.add_argument("--transform", default="dct8-v0", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    shared = shared_dir()
    lfw = lfw_dir(shared)
    spec = PRESETS[args.transform](args.epsilon)
    population = make_population(lfw, args.clients, min_images=2, max_images=args.max_images)
    heldout = Heldout(lfw, spec, args.pairs_per_fold, seed=args.seed)
    settings = ServerSettings(str(shared), spec.to_dict(), args.scope, args.rounds, args.per_round, args.clients,
                              args.seed, {"epochs": args.epochs, "batch-size": 4})
    log = simulate(population, settings, lfw, heldout)
    report = {key: value for key, value in log.items() if key != "final_arrays"}
    report["population"] = {"clients": len(population.clients),
                            "photos": sum(len(c.images) for c in population.clients)}
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
