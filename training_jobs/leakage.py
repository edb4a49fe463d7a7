"""The leak that needs no attacker training: rebuild faces from the features by inverse DCT and measure them.

    python -m training_jobs.leakage --transform dct8-v0 --transform dct8-low10 --transform dct8-all \
        --epsilon 64 --folds 6-10 --out docs/leakage

For each transform (a served preset, or `dct8-all` = every coefficient kept, i.e. no removal, only clip + noise):
- features = `TransformSpec.apply` (the SDK's exact transform, one noise draw per image, seeded);
- rebuild = `inference.transform.inverse` (removed channels zero, inverse DCT, YCbCr -> RGB, rounded to uint8);
- SSIM (gaussian window σ = 1.5, 11x11, K1 = 0.01, K2 = 0.03, L = 255, on the BT.601 luma) and PSNR (RGB, 8-bit)
  of every rebuilt probe against its original;
- identification: SFace embeddings of the rebuilt probes searched against a gallery of CLEAN photos of the
  held-out identities (first image of each identity with >= 2 images among the chosen folds' pairs; probes =
  their other images); rank-1 = nearest gallery identity is right. The clean probes' own rank-1 is measured
  in the same run, on the same gallery (the pixel reference). Chance = 1 / gallery size.
A PNG grid (originals, then one row of rebuilds per transform) goes to OUT/rebuilds_eps<ε>.png and the numbers
to OUT/leakage_eps<ε>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from inference.lfw import lfw_dir, load_many, shared_dir
from inference.transform import COEFFS, PRESETS, TransformSpec, apply, inverse, make_spec
from training_jobs.eval_metrics import rank1
from training_jobs.evaluate import heldout_pairs, identification_split, identity, parse_folds

LUMA = np.array([0.299, 0.587, 0.114])


def spec_all(epsilon: float | None = 64.0) -> TransformSpec:
    """Every coefficient of every channel kept: the no-removal reference (clip + noise only). Never served."""
    return make_spec("dct8-all", tuple(range(COEFFS)), tuple(range(COEFFS)), epsilon)


TRANSFORMS = {**PRESETS, "dct8-all": spec_all}


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of two grey images [H, W] with a gaussian window (σ 1.5, radius 5)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        # radius int(3.5*1.5+0.5) = 5: 11x11
        blurred: np.ndarray = gaussian_filter(x, sigma, truncate=3.5, mode="reflect")
        return blurred

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical images."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def luma(rgb: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.asarray(rgb, dtype=np.float64) @ LUMA
    return result


def image_quality(originals: np.ndarray, rebuilds: np.ndarray) -> dict[str, Any]:
    ssims = np.array([ssim(luma(o), luma(r)) for o, r in zip(originals, rebuilds)])
    psnrs = np.array([psnr(o, r) for o, r in zip(originals, rebuilds)])
    return {"ssim_mean": float(ssims.mean()), "ssim_std": float(ssims.std()),
            "psnr_mean_db": float(psnrs.mean()), "psnr_std_db": float(psnrs.std())}


def rebuild(faces: np.ndarray, spec: TransformSpec, rng: np.random.Generator, batch: int = 256) -> np.ndarray:
    return np.concatenate([inverse(apply(faces[i:i + batch], spec, rng), spec) for i in range(0, len(faces), batch)])


def save_grid(originals: np.ndarray, rows: dict[str, np.ndarray], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(originals)
    names = ["original"] + list(rows)
    fig, axes = plt.subplots(len(names), columns, figsize=(1.3 * columns + 1.6, 1.4 * len(names) + 0.4))
    for r, name in enumerate(names):
        images = originals if name == "original" else rows[name]
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(images[c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(transforms: list[str], epsilon: float | None, folds: tuple[int, ...], out: Path, shared: Path,
        seed: int = 0, max_probes: int | None = None, grid: int = 8, threads: int = 1) -> dict[str, Any]:
    from training_jobs.sface import SFaceEmbedder
    from training_jobs.evaluate import embed_all

    lfw = lfw_dir(shared)
    images = sorted({path for p in heldout_pairs(lfw, folds) for path in (p.left, p.right)})
    gallery_paths, probe_paths = identification_split(images)
    if max_probes is not None and max_probes < len(probe_paths):
        chosen = np.sort(np.random.default_rng(seed).choice(len(probe_paths), max_probes, replace=False))
        probe_paths = [probe_paths[i] for i in chosen]
    gallery_faces = load_many(lfw, gallery_paths)
    probe_faces = load_many(lfw, probe_paths)
    sface = SFaceEmbedder(threads=threads)
    start = time.perf_counter()
    gallery = embed_all(gallery_faces, sface.embed)
    gallery_ids = [identity(p) for p in gallery_paths]
    probe_ids = [identity(p) for p in probe_paths]
    pixel_rank1 = rank1(gallery, gallery_ids, embed_all(probe_faces, sface.embed), probe_ids)
    print(f"gallery {len(gallery_paths)} identities, {len(probe_paths)} probes; SFace rank-1 of the clean probes "
          f"{100 * pixel_rank1:.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)
    rows, grid_rows = [], {}
    show = np.linspace(0, len(probe_paths) - 1, grid).astype(int)
    for name in transforms:
        spec = TRANSFORMS[name](epsilon)
        start = time.perf_counter()
        rebuilt = rebuild(probe_faces, spec, np.random.default_rng(seed))
        quality = image_quality(probe_faces, rebuilt)
        r1 = rank1(gallery, gallery_ids, embed_all(rebuilt, sface.embed), probe_ids)
        row = {"transform": name, "transform_id": spec.transform_id, "kept_channels": spec.num_channels,
               "epsilon_per_coefficient": epsilon, "sface_rank1_rebuilt": r1, **quality,
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        grid_rows[f"{name}\n{spec.transform_id}"] = rebuilt[show]
        print(f"{name} ({spec.transform_id}): SSIM {quality['ssim_mean']:.3f}, PSNR {quality['psnr_mean_db']:.2f} dB, "
              f"SFace rank-1 {100 * r1:.2f}% ({row['seconds']:.0f} s)", flush=True)
    tag = "none" if epsilon is None else f"{epsilon:g}"
    grid_path = save_grid(probe_faces[show], grid_rows, out / f"rebuilds_eps{tag}.png",
                          f"held-out probes (LFW folds {','.join(map(str, folds))}) and naive inverse-DCT rebuilds, ε/coef = {tag}")
    report = {"protocol": __doc__.split("For each transform")[1].split("A PNG grid")[0].strip(),
              "folds": list(folds), "seed": seed, "gallery": len(gallery_paths), "probes": len(probe_paths),
              "chance_rank1": 1.0 / len(gallery_paths), "sface_rank1_clean_probes": pixel_rank1, "rows": rows,
              "grid": str(grid_path)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"leakage_eps{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transform", action="append", choices=sorted(TRANSFORMS), default=None)
    parser.add_argument("--epsilon", default="64", help="ε per coefficient, or 'none' for no noise")
    parser.add_argument("--folds", default="6-10")
    parser.add_argument("--max-probes", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/leakage"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shared-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    epsilon = None if args.epsilon.lower() in ("none", "inf") else float(args.epsilon)
    report = run(args.transform or ["dct8-v0", "dct8-low10", "dct8-all"], epsilon, parse_folds(args.folds),
                 args.out, args.shared_dir or shared_dir(), args.seed, args.max_probes, threads=args.threads)
    print("| transform | transform_id | SSIM | PSNR (dB) | SFace rank-1, rebuilt probes |")
    print("|---|---|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['transform']} | {row['transform_id']} | {row['ssim_mean']:.3f} | {row['psnr_mean_db']:.2f} | "
              f"{100 * row['sface_rank1_rebuilt']:.2f}% |")
    print(f"pixel reference (clean probes, same gallery): {100 * report['sface_rank1_clean_probes']:.2f}%; "
          f"chance {100 * report['chance_rank1']:.2f}%")


if __name__ == "__main__":
    main()
