"""The privacy-accuracy frontier: held-out accuracy of each trained model against the learned attackers' rank-1.

    python -m training_jobs.frontier --runs var/training/gpu-v0 var/training/gpu-low10 ... \
        --attacks docs/attacks/results.json --out docs/models/frontier [--keep]

--keep adds the new runs to the points already in OUT.json (runs trained elsewhere, whose folders are not on this
machine); each kept point's attack figures are read again from the attack results.

Why one plot: a transform is only worth serving if its model recognises people AND the features resist a
learned inverter; each candidate is one point (x: SFace rank-1 of the attacker's reconstructions, y: the
model's accuracy on LFW View-2 folds 6-10). Inputs are measured elsewhere and only collected here: each run's
`final.json` (training_jobs.train's full held-out evaluation) and the attack harness's results file. Writes
OUT.json (the table, committed) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from inference.transform import PRESETS, SCREENED


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config: config.json when the run trained here, else the one inside its checkpoint (a run
    trained on a lent device comes back as a checkpoint only)."""
    if (run_dir / "config.json").exists():
        return dict(json.loads((run_dir / "config.json").read_text()))
    import torch
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return dict(state["config"])


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The figures of one training run's final held-out evaluation."""
    report = json.loads((Path(run_dir) / "final.json").read_text())
    final = report["final"]
    config = run_config(Path(run_dir))
    tars = final["tar_at_far"]
    return {"run": report["name"], "transform": config["transform"]["preset"],
            "epsilon": config["transform"].get("epsilon"), "model": config["model"].get("kind", "frequency-mobilefacenet"),
            "epochs": report["epochs"], "eval_folds": report["eval_folds"], "pairs": final["num_pairs"],
            "accuracy": final["verification"]["accuracy"], "accuracy_std": final["verification"]["accuracy_std"],
            "tar_at_far_1e-3": tars["0.001"]["tar"], "tar_at_far_1e-4": tars["0.0001"]["tar"],
            "far_resolution": tars["far_resolution"], "rank1_identification": final["rank1"]}


def attack_figures(results: list[dict[str, Any]], transform: str, epsilon: float | None) -> dict[str, Any]:
    """Per attack (a1, a2): the strongest measured result on this transform and noise (highest rank-1)."""
    out: dict[str, Any] = {}
    for row in results:
        if row.get("transform") != transform or row.get("rank1") is None:
            continue
        if epsilon is not None and float(row.get("epsilon") or 0) != float(epsilon):
            continue
        best = out.get(row["attack"])
        if best is None or row["rank1"] > best["rank1"]:
            out[row["attack"]] = {"rank1": row["rank1"], "psnr_db": row.get("psnr_mean_db"),
                                  "ssim": row.get("ssim_mean"), "run": row["run"]}
    return out


def kept_points(path: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points already plotted (none when the file is absent), their attack figures refreshed."""
    points: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    for point in points:
        point["attacks"] = attack_figures(results, point["transform"], point["epsilon"])
    return points


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for attack, marker in (("a1", "o"), ("a2", "s")):
        xs = [100 * p["attacks"][attack]["rank1"] for p in points if attack in p["attacks"]]
        ys = [100 * p["accuracy"] for p in points if attack in p["attacks"]]
        ax.scatter(xs, ys, marker=marker, label=f"{attack.upper()} attacker", zorder=3)
        for p in points:
            if attack in p["attacks"]:
                ax.annotate(p["run"], (100 * p["attacks"][attack]["rank1"], 100 * p["accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("SFace rank-1 of the attacker's reconstructions, folds 6-10 (%, lower = more private)")
    ax.set_ylabel("held-out accuracy, LFW folds 6-10 (%)")
    ax.axhline(98.5, color="grey", lw=0.6, ls="--")
    ax.axvline(30, color="grey", lw=0.6, ls=":")
    ax.axvline(5, color="grey", lw=0.6, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("privacy-accuracy frontier (targets dashed/dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--keep", action="store_true", help="keep OUT.json's points of other runs")
    parser.add_argument("--attacks", type=Path, default=Path("docs/attacks/results.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/models/frontier"))
    args = parser.parse_args(argv)
    results = json.loads(args.attacks.read_text())
    points = kept_points(args.out.with_suffix(".json"), results) if args.keep else []
    for run_dir in args.runs:
        summary = run_summary(run_dir)
        if summary["transform"] not in {**PRESETS, **SCREENED}:
            raise SystemExit(f"error: {run_dir}: unknown transform {summary['transform']!r}")
        summary["attacks"] = attack_figures(results, summary["transform"], summary["epsilon"])
        points = [p for p in points if p["run"] != summary["run"]] + [summary]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=1) + "\n")
    plot(points, args.out.with_suffix(".png"))
    for p in points:
        attacks = ", ".join(f"{k.upper()} {100 * v['rank1']:.1f}%" for k, v in sorted(p["attacks"].items()))
        print(f"{p['run']:>18}: accuracy {100 * p['accuracy']:.2f}% ± {100 * p['accuracy_std']:.2f}, "
              f"TAR@1e-3 {100 * p['tar_at_far_1e-3']:.1f}%  |  {attacks or 'no attack measured'}")


if __name__ == "__main__":
    main()
