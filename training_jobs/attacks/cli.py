"""Command line: train an attack for a fixed budget (resumable), score it on folds 6-10, rebuild the docs.

    nice -n 5 python -m training_jobs.attacks run --attack a1 --transform dct8-v0 --epsilon 64 --minutes 8
    python -m training_jobs.attacks table          # README table + grids from docs/attacks/results.json

`run` trains in var/attacks/<run>/ (checkpoint.pt; rerunning the same command resumes an unfinished run and
only re-scores a finished one), then writes its row into docs/attacks/results.json, the table in
docs/attacks/README.md and the grid docs/attacks/grid_<transform>_eps<ε>.png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.lfw import lfw_dir, shared_dir
from inference.transform import PRESETS, SCREENED, TransformSpec
from training_jobs.attacks.a1_inverter import A1
from training_jobs.attacks.a2_identity import A2
from training_jobs.attacks.a3_embedding import A3
from training_jobs.attacks.data import ProbeSet, normaliser, probe_set, to_uint8, training_faces
from training_jobs.attacks.evaluation import (grid_indices, run_batched, score_embeddings, score_images,
                                              upsert_result, write_grid, write_table)
from training_jobs.attacks.training import Budget, train
from training_jobs.evaluate import pixel_mobilefacenet_embedder

ATTACKS = ("a1", "a2", "a3")


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def parse_epsilon(text: str) -> float | None:
    return None if text.lower() in ("none", "inf") else float(text)


def epsilon_tag(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"{epsilon:g}"


def run_name(attack: str, transform: str, epsilon: float | None, minutes: float, clock: str = "wall") -> str:
    return f"{attack}-{transform}-eps{epsilon_tag(epsilon)}-{minutes:g}min" + ("-cpu" if clock == "cpu" else "")


def make_attack(name: str, spec: TransformSpec, shared: Path, ssim_weight: float, identity_weight: float,
                ) -> A1 | A2 | A3:
    if name == "a1":
        return A1(spec.num_channels, ssim_weight)
    if name == "a2":
        return A2(spec.num_channels, shared, identity_weight, ssim_weight)
    if name == "a3":
        return A3(spec.num_channels, shared)
    raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")


def evaluate(attack: A1 | A2 | A3, spec: TransformSpec, args: argparse.Namespace, run_dir: Path, lfw: Path,
             shared: Path) -> dict[str, Any]:
    probes = probe_set(lfw, args.max_probes, args.seed, args.max_eval_identities)
    features = probes.probe_features(spec, args.seed, args.releases, args.pinned_subset)
    scale = normaliser(spec)
    cache = args.runs_dir / "cache"
    if isinstance(attack, A3):  # predicts embeddings; A1 and A2 rebuild images
        predicted = run_batched(attack.embed, features, scale).numpy()
        return score_embeddings(predicted, probes, pixel_mobilefacenet_embedder(shared), cache) | _sizes(probes)
    from training_jobs.sface import SFaceEmbedder
    rebuilt = to_uint8(run_batched(attack.reconstruct, features, scale))
    np.save(run_dir / "grid.npy", rebuilt[grid_indices(len(rebuilt))])
    return score_images(rebuilt, probes, SFaceEmbedder(threads=args.threads).embed, cache) | _sizes(probes)


def _sizes(probes: ProbeSet) -> dict[str, Any]:
    return {"probes": len(probes.probe_paths), "gallery": len(probes.gallery_paths),
            "chance_rank1": 1.0 / len(probes.gallery_paths)}


def check_run_options(args: argparse.Namespace) -> None:
    """Refuse, in one line before anything loads, subset options that would attack another transform than named."""
    spec = {**PRESETS, **SCREENED}[args.transform](args.epsilon)
    if args.random_channels is not None:
        if spec.random_channels is not None:
            parser().error(f"--random-channels: {args.transform} already releases {spec.random_channels} channels")
        if not 0 < args.random_channels < spec.num_channels:
            parser().error(f"--random-channels must be in 1..{spec.num_channels - 1} for {args.transform}")
        if spec.epsilon_weights is not None:
            parser().error(f"--random-channels: {args.transform} is an allocated spec (its ε would depend on the subset)")
    if args.pinned_subset and (args.releases == 1 or (spec.random_channels is None and args.random_channels is None)):
        parser().error("--pinned-subset needs --releases > 1 and a random-subset transform")


def command_run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shared = args.shared_dir or shared_dir()
    lfw = lfw_dir(shared)
    spec = {**PRESETS, **SCREENED}[args.transform](args.epsilon)
    transform = args.transform
    if args.random_channels is not None:  # a random subset per image (PartialFace-style) is its own candidate
        spec = replace(spec, random_channels=args.random_channels)
        transform = f"{args.transform}-r{args.random_channels}"  # as inference.transform.spec_random_subset names it
    # each photo seen that many times, merged ("p": with the same subset each time, as the SDK pins it)
    transform += "" if args.releases == 1 else f"-x{args.releases}" + ("p" if args.pinned_subset else "")
    name = args.name or run_name(args.attack, transform, args.epsilon, args.minutes, args.clock)
    run_dir = args.runs_dir / name
    attack = make_attack(args.attack, spec, shared, args.ssim_weight, args.identity_weight)
    dataset = training_faces(lfw, spec, args.seed, args.max_train_identities, args.max_images_per_identity,
                             args.releases, args.pinned_subset)
    budget = Budget(args.minutes, args.batch, args.lr, args.seed, max_steps=args.max_steps, clock=args.clock)
    meta = {"attack": args.attack, "transform": transform, "transform_id": spec.transform_id,
            **({"random_channels": args.random_channels} if args.random_channels is not None else {}),
            **({"releases": args.releases, "pinned_subset": args.pinned_subset} if args.releases != 1 else {}),
            "epsilon": epsilon_tag(args.epsilon), "minutes": args.minutes, "clock": args.clock, "batch": args.batch,
            **({"max_steps": args.max_steps} if args.max_steps is not None else {})}
    started = time.perf_counter()
    progress = train(attack, dataset, budget, run_dir / "checkpoint.pt", meta)
    print(f"trained {progress.step} steps, {progress.epoch + progress.position / len(dataset):.2f} epochs, "
          f"{progress.elapsed:.0f} s of training", flush=True)
    scores = evaluate(attack, spec, args, run_dir, lfw, shared)
    row = {"run": name, **meta, "threads": args.threads, "train_images": len(dataset), "steps": progress.step,
           "epochs": progress.epoch + progress.position / len(dataset), "train_seconds": round(progress.elapsed, 1),
           "train_wall_seconds": round(progress.wall, 1),
           "loss_first": progress.losses[0] if progress.losses else None,
           "loss_last": progress.losses[-1] if progress.losses else None,
           "ssim_weight": args.ssim_weight, "identity_weight": args.identity_weight if args.attack == "a2" else None,
           "seed": args.seed, **scores, "eval_seconds": round(time.perf_counter() - started - progress.wall, 1),
           "command": args.command_line}
    print(json.dumps({k: v for k, v in row.items() if k != "command"}, indent=1), flush=True)
    rows = upsert_result(args.out / "results.json", row)
    if args.max_eval_identities is None and args.max_probes == 1000:  # only full-protocol runs go in the docs
        write_table(args.out / "README.md", rows)
        write_grid(args.out, transform, epsilon_tag(args.epsilon), probe_set(lfw, 1000, args.seed).probe_faces[
            grid_indices(1000)], args.runs_dir, rows)
    return row


def command_table(args: argparse.Namespace) -> None:
    rows = json.loads((args.out / "results.json").read_text())
    write_table(args.out / "README.md", rows)
    lfw = lfw_dir(args.shared_dir or shared_dir())
    originals = probe_set(lfw, 1000, 0).probe_faces[grid_indices(1000)]
    for transform, eps in sorted({(r["transform"], str(r["epsilon"])) for r in rows}):
        write_grid(args.out, transform, eps, originals, args.runs_dir, rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training_jobs.attacks", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train (or resume) an attack for a fixed budget, then score it")
    run.add_argument("--attack", choices=ATTACKS, required=True)
    run.add_argument("--transform", choices=sorted({**PRESETS, **SCREENED}), required=True)
    run.add_argument("--epsilon", type=parse_epsilon, default=64.0, help="ε per coefficient, or 'none'")
    run.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    run.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                     help="what --minutes counts: wall time, or this process's CPU time (fairer on a busy CPU)")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--batch", type=int, default=32)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--ssim-weight", type=float, default=0.0)
    run.add_argument("--identity-weight", type=float, default=0.5, help="A2 only")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-probes", type=int, default=1000)
    run.add_argument("--max-steps", type=int, default=None,
                     help="stop at this many steps if the minutes last that long (tests; matching a run of another machine)")
    run.add_argument("--max-train-identities", type=int, default=None, help="tests: a small training split")
    run.add_argument("--max-images-per-identity", type=int, default=None)
    run.add_argument("--max-eval-identities", type=int, default=None, help="tests: a small gallery")
    run.add_argument("--random-channels", type=int, default=None, metavar="N",
                     help="each image keeps N of the transform's channels, chosen at random (PartialFace-style)")
    run.add_argument("--releases", type=at_least_one, default=1, metavar="K",
                     help="the attacker sees each photo K times (fresh noise and subset each) and merges them")
    run.add_argument("--pinned-subset", action="store_true",
                     help="with --releases: every release of a photo has the same channel subset (the SDK's device key)")
    run.add_argument("--name", default=None, help="run name (default: attack-transform-eps-minutes)")
    table = sub.add_parser("table", help="rebuild the README table and grids from results.json")
    for sp in (run, table):
        sp.add_argument("--out", type=Path, default=Path("docs/attacks"))
        sp.add_argument("--runs-dir", type=Path, default=Path("var/attacks"))
        sp.add_argument("--shared-dir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command == "run":
        check_run_options(args)
    args.command_line = "python -m training_jobs.attacks " + " ".join(argv)
    if args.command == "run":
        command_run(args)
    else:
        command_table(args)


if __name__ == "__main__":
    main()
