"""The figures and the table of a held-out evaluation (`training_jobs/evaluate.py`): ROC and DET curves of
the models compared, accuracy against ε, and the Markdown table the docs quote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training_jobs.eval_metrics import roc_points

if TYPE_CHECKING:  # evaluate.py imports this module
    from training_jobs.evaluate import ModelResult


def print_and_save(report: dict[str, Any], out: Path | None) -> None:
    """A measurement's JSON report on stdout and, with ``out``, in that file (its folder made)."""
    text = json.dumps(report, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def plot_roc_det(results: list[ModelResult], out_dir: Path, title: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    out_dir.mkdir(parents=True, exist_ok=True)
    fig_roc, ax_roc = plt.subplots(figsize=(6, 4.5))
    fig_det, ax_det = plt.subplots(figsize=(6, 4.5))
    for result in results:
        far, tar, _ = roc_points(result.scores, result.same)
        label = f"{result.name} [{result.input}]"
        ax_roc.plot(np.maximum(far, 1e-5), tar, label=label)
        fnmr = np.clip(1 - tar, 1e-5, 1 - 1e-5)
        fmr = np.clip(far, 1e-5, 1 - 1e-5)
        ax_det.plot(norm.ppf(fmr), norm.ppf(fnmr), label=label)
    ax_roc.set_xscale("log")
    ax_roc.set_xlim(1e-4, 1)
    ax_roc.set_xlabel("false accept rate")
    ax_roc.set_ylabel("true accept rate")
    ax_roc.set_title(f"ROC — {title}")
    ax_roc.grid(True, which="both", alpha=0.3)
    ax_roc.legend(fontsize=7, loc="lower right")
    ticks = np.array([1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5])
    ax_det.set_xticks(norm.ppf(ticks), [f"{t:g}" for t in ticks])
    ax_det.set_yticks(norm.ppf(ticks), [f"{t:g}" for t in ticks])
    ax_det.set_xlim(norm.ppf(1e-4), norm.ppf(0.6))
    ax_det.set_ylim(norm.ppf(1e-4), norm.ppf(0.6))
    ax_det.set_xlabel("false match rate")
    ax_det.set_ylabel("false non-match rate")
    ax_det.set_title(f"DET — {title}")
    ax_det.grid(True, alpha=0.3)
    ax_det.legend(fontsize=7, loc="upper right")
    paths = [out_dir / "roc.png", out_dir / "det.png"]
    fig_roc.tight_layout()
    fig_roc.savefig(paths[0], dpi=110)
    fig_det.tight_layout()
    fig_det.savefig(paths[1], dpi=110)
    plt.close(fig_roc)
    plt.close(fig_det)
    return paths


def plot_accuracy_vs_epsilon(rows: list[tuple[float | None, float, float]], reference: dict[str, float],
                             path: Path, title: str) -> Path:
    """rows: (ε per coefficient or None, accuracy, std); reference: horizontal lines (e.g. pixel teachers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [(e, a, s) for e, a, s in rows if e is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if finite:
        finite.sort()
        ax.errorbar([e for e, _, _ in finite], [100 * a for _, a, _ in finite],
                    yerr=[100 * s for _, _, s in finite], marker="o", capsize=3, label="noisy features")
    for e, a, _ in rows:
        if e is None:
            ax.axhline(100 * a, color="grey", linestyle="--", label="no noise (ε = ∞)")
    for name, value in reference.items():
        ax.axhline(100 * value, linestyle=":", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ε per coefficient (Laplace; smaller = more noise)")
    ax.set_ylabel("accuracy, %")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(results: list[ModelResult]) -> str:
    lines = ["| model | input | accuracy (leave-one-fold-out) | TAR@FAR=1e-3 | TAR@FAR=1e-4 | rank-1 (1:N) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        v = r.verification
        acc = f"{100 * v['accuracy']:.2f}% ± {100 * v['accuracy_std']:.2f}" if "accuracy" in v else "–"
        lines.append(f"| {r.name} | {r.input} | {acc} | {100 * r.tar_at_far['0.001']['tar']:.2f}% | "
                     f"{100 * r.tar_at_far['0.0001']['tar']:.2f}% | {100 * r.rank1:.2f}% |")
    return "\n".join(lines)
