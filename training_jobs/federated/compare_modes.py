"""Supervised vs unsupervised rounds, each without and with GAN impostor negatives, in ONE run (needs flwr).

    PYTHONPATH=$PWD .venv-federated/bin/python -m training_jobs.federated.compare_modes --clients 30 \\
        --per-round 10 --rounds 3 --scope adapter-tail --pairs-per-fold 150 \\
        --out docs/results/federated_modes_impostors.json

The same held-out pairs (LFW View-2 folds 6-10, never a client) and the same noise draws for every evaluation
(`Heldout`: its generator is re-created from the seed each time); the starting model is the same served v0 for
all four runs, so it is evaluated once ("before"). Same seeds, so the supervised runs sample the same clients
in the same rounds with and without impostors (likewise the unsupervised ones). Populations: supervised = the
first N training identities by name with >= 2 photos; unsupervised = the first N with >= `--unsup-min-images`
photos (1 by default: identities with one photo serve this mode), <= `--max-images` photos each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


from training_jobs.federated.compare import summary
from training_jobs.federated.heldout import Heldout
from training_jobs.federated.impostors import DEFAULT_CHECKPOINT
from training_jobs.federated.params import build_base_model
from training_jobs.federated.population import Population, make_population
from training_jobs.federated.script import run_arguments, setup, write_report
from training_jobs.federated.settings import ServerSettings
from training_jobs.federated.simulate import mode_config, simulate

RUNS = (("supervised", "none"), ("supervised", "gan"), ("unsupervised", "none"), ("unsupervised", "gan"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser, clients=30, per_round=10, rounds=3, pairs_per_fold=150, scope="adapter-tail",
                  max_images=4)
    parser.add_argument("--unsup-min-images", type=int, default=1)
    parser.add_argument("--impostor-checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--runs", default=",".join(f"{m}/{n}" for m, n in RUNS),
                        help="comma-separated mode/negatives pairs")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--skip-before", action="store_true",
                        help="do not evaluate the starting model (measured by an earlier run on the same pairs)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shared, lfw, spec = setup()
    heldout = Heldout(lfw, spec, args.pairs_per_fold, seed=args.seed)
    report: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out), "impostor_checkpoint": str(args.impostor_checkpoint),
                                              "transform": spec.transform_id, "heldout_folds": [6, 7, 8, 9, 10]},
                    "before": None if args.skip_before else heldout.evaluate(build_base_model(spec, shared), "before"),
                    "runs": {}}
    print(json.dumps({"before": report["before"]}), flush=True)
    for pair in args.runs.split(","):
        mode, negatives = pair.split("/")
        population = make_population(lfw, args.clients, min_images=args.unsup_min_images if mode == "unsupervised"
                                     else 2, max_images=args.max_images)
        local = {"epochs": args.epochs, "batch-size": 4, **mode_config(mode, negatives, args.impostor_checkpoint)}
        settings = ServerSettings(str(shared), spec.to_dict(), args.scope, args.rounds, args.per_round, args.clients,
                                  args.seed, local, (args.rounds,), heldout_pairs_per_fold=args.pairs_per_fold)
        log = simulate_with_retry(population, settings, lfw, heldout)
        run = summary(log)
        run["retried_after"] = log.get("retried_after")
        run["after"] = run.pop("heldout")[str(args.rounds)]
        run["population"] = {"clients": len(population.clients),
                             "photos": sum(len(c.images) for c in population.clients),
                             "single_photo_clients": sum(len(c.images) == 1 for c in population.clients)}
        report["runs"][pair] = run
        print(json.dumps({pair: {k: run["after"][k] for k in ("accuracy", "tar_at_far_1e-3", "rank1")}}), flush=True)
        write_report(report, args.out)  # after every run: a later crash keeps the runs measured so far
    report["wall_seconds"] = time.perf_counter() - start
    print(write_report(report, args.out))


def simulate_with_retry(population: Population, settings: ServerSettings, lfw: Path, heldout: Heldout) -> dict[str, Any]:
    """One simulation, started a second time if Ray's runtime fails to start (seen here on an overloaded machine:
    "The current node timed out during startup"); the retry is recorded in the log."""
    try:
        return simulate(population, settings, lfw, heldout)
    except RuntimeError as exc:
        print(json.dumps({"retry": str(exc)[:200]}), flush=True)
        log = simulate(population, settings, lfw, heldout)
        log["retried_after"] = str(exc)[:200]
        return log


if __name__ == "__main__":
    main()
