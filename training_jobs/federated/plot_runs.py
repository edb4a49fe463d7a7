"""Held-out accuracy and TAR@FAR 1e-3 before and after federated runs, side by side, from simulate's reports.

    python -m training_jobs.federated.plot_runs --run "v0, LFW clients=docs/results/federated_scale_lfw_v0_default.json" \\
        --run ... --out docs/federated_scale.png

Why a plot: the runs start from different models and are scored on different held-out sets, so a table of
numbers hides what the reader compares — the length and direction of each before -> after arrow. Each run's
report holds its own "before" (round 0) and "after" (its last round), measured on the same pairs and noise draws.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

METRICS = (("accuracy", "accuracy (%)"), ("tar_at_far_1e-3", "TAR at FAR 1e-3 (%)"))


def before_after(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(round 0, last round) held-out metrics of one simulate report; refused in one line without both."""
    heldout = report.get("heldout") or {}
    rounds = sorted(int(r) for r in heldout)
    if len(rounds) < 2 or rounds[0] != 0:
        raise ValueError("the report has no held-out metrics before and after its rounds")
    return heldout["0"], heldout[str(rounds[-1])]


def parse_run(text: str) -> tuple[str, Path]:
    """LABEL=PATH (argparse turns the ValueError into one usage line)."""
    label, sep, path = text.partition("=")
    if not sep or not label or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected LABEL=REPORT.json of an existing file, got {text!r}")
    return label, Path(path)


def plot(runs: list[tuple[str, dict[str, Any]]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 0.55 * len(runs) + 1.8), sharey=True)
    for ax, (key, title) in zip(axes, METRICS):
        for row, (label, report) in enumerate(runs):
            before, after = before_after(report)
            x0, x1 = 100 * before[key], 100 * after[key]
            ax.annotate("", xy=(x1, row), xytext=(x0, row),
                        arrowprops={"arrowstyle": "->", "color": "tab:green" if x1 >= x0 else "tab:red", "lw": 2})
            ax.plot([x0], [row], "o", color="grey")
            ax.text(min(x0, x1) - 0.8, row, f"{x0:.1f} → {x1:.1f}", va="center", ha="right", fontsize=8)
        ax.set_title(title)
        low = min(100 * min(before_after(r)[i][key] for _, r in runs for i in (0, 1)), 100)
        ax.set_xlim(low - 0.35 * (100 - low) - 6, 100.5)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, help="LABEL=simulate report JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = [(label, json.loads(path.read_text())) for label, path in args.run]
    for label, report in runs:
        try:
            before_after(report)
        except ValueError as exc:
            parser.error(f"{label}: {exc}")
    plot(runs, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
