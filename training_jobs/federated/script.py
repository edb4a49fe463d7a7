"""What the federated measurement scripts (compare, compare_modes, inversion_bench, train_impostors) share:
the run-size arguments, the setup on this shared machine, and how a report is written.

Why one place: the scripts measure runs that must be comparable (the same population, pairs and noise draws
for the same arguments), so they read those arguments, build the transform and write their JSON the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from inference.lfw import lfw_dir, shared_dir
from inference.transform import PRESETS, TransformSpec


def run_arguments(parser: argparse.ArgumentParser, *, clients: int, per_round: int, rounds: int,
                  pairs_per_fold: int, scope: str | None = None, max_images: int | None = None) -> None:
    """--clients, --per-round, --rounds, [--scope, --max-images,] --pairs-per-fold, --seed and --out, with the
    script's defaults (--scope and --max-images only when the script gives them a default)."""
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--per-round", type=int, default=per_round)
    parser.add_argument("--rounds", type=int, default=rounds)
    if scope is not None:
        parser.add_argument("--scope", default=scope, choices=("whole", "adapter-tail"))
    if max_images is not None:
        parser.add_argument("--max-images", type=int, default=max_images)
    parser.add_argument("--pairs-per-fold", type=int, default=pairs_per_fold)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)


def setup(transform: str = "dct8-v0", epsilon: float = 64.0) -> tuple[Path, Path, TransformSpec]:
    """torch on one thread (a shared 2-core machine); the shared folder, its aligned LFW and the transform."""
    torch.set_num_threads(1)
    shared = shared_dir()
    return shared, lfw_dir(shared), PRESETS[transform](epsilon)


def write_report(report: dict[str, Any], out: Path | None) -> str:
    """The report as indented JSON, also written to `out` (its folder made) when given; returns the text."""
    text = json.dumps(report, indent=1, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text
