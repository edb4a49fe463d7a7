"""Scoring an attack on LFW folds 6-10, and the results file and table the docs are built from.

Protocol (same probes, same noise draw for every attack on a given transform and ε):
- probes/gallery: `data.probe_set` (folds 6-10 identities with >= 2 images; first image of each = clean
  gallery; a seeded subset of the others = probes; the same sets as `training_jobs.leakage`);
- image attacks (A1, A2): PSNR (RGB, 8-bit) and SSIM (luma, gaussian 11x11 σ 1.5) of each reconstruction against
  its original (`training_jobs.leakage` metrics); SFace rank-1 of the reconstructions against the clean gallery
  (chance = 1 / gallery size; the clean probes' own rank-1 is the ceiling); TAR at FAR 1e-3 over every
  (reconstruction, clean gallery image) score: genuine = same identity, impostor = every other gallery identity;
- embedding attack (A3): the same rank-1 and TAR, in the pixel MobileFaceNet's space (predicted embedding of
  the probe's features vs MobileFaceNet embeddings of the clean gallery).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training_jobs.attacks.data import ProbeSet
from training_jobs.eval_metrics import rank1, roc_points
from training_jobs.evaluate import embed_all
from training_jobs.leakage import image_quality, save_grid

EmbedFn = Callable[[np.ndarray], np.ndarray]  # faces or features -> embeddings

GRID_SIZE = 8
TABLE_START = "<!-- attacks-table:start -->"
TABLE_END = "<!-- attacks-table:end -->"


def run_batched(fn: Callable[[torch.Tensor], torch.Tensor], features: np.ndarray, scale: torch.Tensor,
                batch: int = 64) -> torch.Tensor:
    """fn on normalised features, in batches, without gradients."""
    with torch.inference_mode():
        return torch.cat([fn(torch.from_numpy(features[i:i + batch]) / scale)
                          for i in range(0, len(features), batch)])


def identification(gallery: np.ndarray, gallery_ids: list[str], probes: np.ndarray, probe_ids: list[str],
                   target_far: float = 1e-3) -> dict[str, Any]:
    """rank-1, and TAR at target FAR over all probe-vs-gallery scores (embeddings L2-normalised)."""
    scores = probes @ gallery.T
    same = np.array([[p == g for g in gallery_ids] for p in probe_ids])
    far, tar, _ = roc_points(scores.ravel(), same.ravel())
    ok = np.flatnonzero(far <= target_far + 1e-12)
    return {"rank1": rank1(gallery, gallery_ids, probes, probe_ids),
            "tar_at_far_1e-3": float(tar[ok[-1]]) if len(ok) else 0.0,
            "genuine_scores": int(same.sum()), "impostor_scores": int((~same).sum())}


def cached_embeddings(faces: np.ndarray, paths: list[str], embed: EmbedFn, cache_dir: Path, tag: str) -> np.ndarray:
    """Embeddings of clean faces, cached by (embedder tag, image list): they do not depend on the attack."""
    key = hashlib.sha256(("\n".join(paths) + tag).encode()).hexdigest()[:16]
    path = cache_dir / f"{tag}-{key}.npy"
    if path.exists():
        result: np.ndarray = np.load(path)
        return result
    vectors = embed_all(faces, embed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)  # atomic: a run in parallel never reads half a file
    return vectors


def grid_indices(count: int) -> np.ndarray:
    return np.linspace(0, count - 1, min(GRID_SIZE, count)).astype(int)


def score_images(rebuilt: np.ndarray, probes: ProbeSet, sface_embed: EmbedFn, cache_dir: Path) -> dict[str, Any]:
    """PSNR/SSIM and SFace identification of reconstructions [N, 112, 112, 3] uint8 of the probes."""
    gallery = cached_embeddings(probes.gallery_faces, probes.gallery_paths, sface_embed, cache_dir, "sface")
    clean = cached_embeddings(probes.probe_faces, probes.probe_paths, sface_embed, cache_dir, "sface")
    ident = identification(gallery, probes.gallery_ids, embed_all(rebuilt, sface_embed), probes.probe_ids)
    return {**image_quality(probes.probe_faces, rebuilt), **ident, "scorer": "sface",
            "sface_rank1_clean_probes": rank1(gallery, probes.gallery_ids, clean, probes.probe_ids)}


def score_embeddings(predicted: np.ndarray, probes: ProbeSet, pixel_embed: EmbedFn, cache_dir: Path) -> dict[str, Any]:
    """Identification of predicted pixel-model embeddings against the pixel model's clean gallery."""
    gallery = cached_embeddings(probes.gallery_faces, probes.gallery_paths, pixel_embed, cache_dir, "mfn")
    clean = cached_embeddings(probes.probe_faces, probes.probe_paths, pixel_embed, cache_dir, "mfn")
    predicted = predicted / np.linalg.norm(predicted, axis=1, keepdims=True)
    return {**identification(gallery, probes.gallery_ids, predicted.astype(np.float64), probes.probe_ids),
            "scorer": "pixel-mobilefacenet",
            "pixel_rank1_clean_probes": rank1(gallery, probes.gallery_ids, clean, probes.probe_ids)}


# ------------------------------------------------------------------------------------------------
# Results file, grid and table

def upsert_result(path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the row with the same run name (or add it); the file is the single source of the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # runs in parallel must not lose each other's rows
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if r["run"] != row["run"]] + [row]
        rows.sort(key=lambda r: (r["transform"], str(r["epsilon"]), r["attack"], r["minutes"]))
        path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def budget_label(row: dict[str, Any]) -> str:
    """What stopped the run: its step cap when it reached one (a CPU-minute differs ~2x between machines, so runs
    compared across sessions are matched in steps), otherwise its minutes."""
    clock = row.get("clock", "wall")
    cap = row.get("max_steps")
    if cap is not None and row["steps"] >= cap:
        return f"{cap} steps ({row['train_seconds'] / 60:.0f} min {clock})"
    return f"{row['minutes']:g} min {clock}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| attack | transform | ε/coef | budget | steps (epochs) | rank-1 | chance | clean rank-1 | "
             "TAR@FAR1e-3 | PSNR (dB) | SSIM | probes / gallery |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        clean = r.get("sface_rank1_clean_probes", r.get("pixel_rank1_clean_probes"))
        lines.append(
            f"| {r['attack'].upper()} ({r['scorer']}) | {r['transform']} | {r['epsilon']} | {budget_label(r)} | "
            f"{r['steps']} ({r['epochs']:.2f}) | **{_pct(r['rank1'])}** | {_pct(r['chance_rank1'], 2)} | {_pct(clean)} | "
            f"{_pct(r['tar_at_far_1e-3'])} | {_num(r.get('psnr_mean_db'), 2)} | {_num(r.get('ssim_mean'), 3)} | "
            f"{r['probes']} / {r['gallery']} |")
    return "\n".join(lines)


def write_table(readme: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the table between the README's markers (added at the end if missing)."""
    text = readme.read_text() if readme.exists() else "# Learned attacks\n"
    table = f"{TABLE_START}\n{markdown_table(rows)}\n{TABLE_END}"
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + table + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    readme.write_text(text)


def write_grid(out: Path, transform: str, epsilon_tag: str, originals: np.ndarray, runs_dir: Path,
               rows: list[dict[str, Any]]) -> Path | None:
    """clean | reconstruction per image-attack run of this transform and ε (from each run's grid.npy)."""
    candidates = {}
    for r in rows:
        grid_file = runs_dir / r["run"] / "grid.npy"
        if r["transform"] == transform and str(r["epsilon"]) == epsilon_tag and grid_file.exists():
            candidates[f"{r['attack'].upper()}\n{budget_label(r)}"] = np.load(grid_file)
    if not candidates:
        return None
    return save_grid(originals, candidates, out / f"grid_{transform}_eps{epsilon_tag}.png",
                     f"LFW folds 6-10 probes (top) and learned reconstructions, {transform}, ε/coef {epsilon_tag}")
