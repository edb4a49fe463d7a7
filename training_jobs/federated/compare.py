"""FedAvg vs SecAgg+ in one run: the same population, seeds, sampling and held-out pairs, one simulation each
(needs flwr[simulation]).

    .venv-federated/bin/python -m training_jobs.federated.compare --clients 30 --per-round 10 --rounds 3 \\
        --scope whole --pairs-per-fold 60 --out docs/results/federated_secagg_vs_fedavg.json

Reports per aggregation: the round times (round 1 includes starting the Ray actor and loading the models, so
the overhead is read on rounds 2..n; with --repeat the runs alternate fedavg, secagg+, fedavg, ... so a change
in the load of this shared machine hits both alike, and the held-out evaluation runs in the first pair only), payload bytes per client each way, held-out metrics before/after (LFW
folds 6-10, same pairs and noise draws), and the largest difference between the final global parameters of
the two runs (SecAgg+ quantises each update: the difference should be of the order of its step, 2 * clip /
2^22 per unit of weight, carried through the later rounds' training). With --drop-fraction, a third run:
SecAgg+ with that share of each round's clients dropping after key sharing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from training_jobs.federated.heldout import Heldout
from training_jobs.federated.population import make_population
from training_jobs.federated.script import run_arguments, setup, write_report
from training_jobs.federated.secagg import SecAggSettings
from training_jobs.federated.settings import ServerSettings
from training_jobs.federated.simulate import simulate


def summary(log: dict[str, Any]) -> dict[str, Any]:
    """What the comparison keeps of one run's log."""
    later = [r["train_seconds"] for r in log["rounds"][1:]]
    return {"rounds": [{k: v for k, v in r.items() if k != "replied_clients"} for r in log["rounds"]],
            "mean_round_seconds_after_first": float(np.mean(later)) if later else None,
            "heldout": log.get("heldout"), "wall_seconds": log.get("wall_seconds")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser, clients=30, per_round=10, rounds=3, pairs_per_fold=60, scope="whole", max_images=4)
    parser.add_argument("--secagg-clip", type=float, default=SecAggSettings.clipping_range)
    parser.add_argument("--drop-fraction", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two runs this many times")
    parser.add_argument("--max-shares", type=int, default=SecAggSettings.max_shares)
    args = parser.parse_args(argv)
    shared, lfw, spec = setup()
    population = make_population(lfw, args.clients, min_images=2, max_images=args.max_images)
    heldout = Heldout(lfw, spec, args.pairs_per_fold, seed=args.seed)
    runs = [(aggregation, 0.0, rep) for rep in range(args.repeat) for aggregation in ("fedavg", "secagg+")]
    runs += [("secagg+", args.drop_fraction, 0)] if args.drop_fraction else []
    logs, report = {}, {"settings": vars(args) | {"out": str(args.out)}, "runs": {}}
    for aggregation, drop, rep in runs:
        name = aggregation + (f" drop {drop:g}" if drop else "") + (f" #{rep + 1}" if rep else "")
        settings = ServerSettings(str(shared), spec.to_dict(), args.scope, args.rounds, args.per_round, args.clients,
                                  args.seed, {"epochs": 1, "batch-size": 4}, None, aggregation,
                                  {"clipping_range": args.secagg_clip, "max_weight": args.max_images,
                                   "max_shares": args.max_shares}, drop, heldout_pairs_per_fold=args.pairs_per_fold)
        logs[name] = simulate(population, settings, lfw, heldout if rep == 0 else None)
        report["runs"][name] = summary(logs[name])
        print(json.dumps({name: report["runs"][name]["mean_round_seconds_after_first"]}), flush=True)
    plain, secure = logs["fedavg"]["final_arrays"], logs["secagg+"]["final_arrays"]
    diffs = np.concatenate([np.abs(plain[k] - secure[k]).ravel() for k in plain])
    report["param_difference_fedavg_vs_secagg"] = {"max_abs": float(diffs.max()), "mean_abs": float(diffs.mean())}
    times = {agg: [t for name, run in report["runs"].items() if name.split(" #")[0] == agg
                   for t in [r["train_seconds"] for r in run["rounds"][1:]]] for agg in ("fedavg", "secagg+")}
    report["mean_round_seconds_after_first"] = {agg: float(np.mean(t)) for agg, t in times.items()}
    report["secagg_time_ratio"] = report["mean_round_seconds_after_first"]["secagg+"] / \
        report["mean_round_seconds_after_first"]["fedavg"]
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
