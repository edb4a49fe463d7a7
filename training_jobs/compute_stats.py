"""Measure the per-channel std of every DCT frequency plane and write inference/transforms/dct8_stats.json.

The clip bounds (and with them the noise scales and ε) of every transform derive from these numbers, so
they come only from LFW identities that appear in NO fold of pairs.txt: no evaluated face shapes them.

    python -m training_jobs.compute_stats [--num-images 3000] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.transform import STATS_PATH, full_coefficients

CHANNELS = ("Y", "Cb", "Cr")


def sample_images(lfw: Path, num_images: int, seed: int) -> list[str]:
    candidates = images_outside_pairs(lfw)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(candidates), size=min(num_images, len(candidates)), replace=False)
    return sorted(candidates[i] for i in chosen)


def channel_stats(lfw: Path, images: list[str], chunk: int = 256) -> dict[str, np.ndarray]:
    """Mean and std over images and block positions, per (colour, frequency): arrays [3, 64]."""
    total = np.zeros((3, 64))
    total_sq = np.zeros((3, 64))
    count = 0
    for start in range(0, len(images), chunk):
        coef = full_coefficients(load_many(lfw, images[start:start + chunk]))  # [n, 3, 64, 14, 14]
        total += coef.sum(axis=(0, 3, 4))
        total_sq += (coef ** 2).sum(axis=(0, 3, 4))
        count += coef.shape[0] * coef.shape[3] * coef.shape[4]
    mean = total / count
    return {"mean": mean, "std": np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))}


def build_record(lfw: Path, images: list[str], seed: int) -> dict[str, Any]:
    stats = channel_stats(lfw, images)
    listing = hashlib.sha256("\n".join(images).encode()).hexdigest()
    return {
        "description": "Per-channel mean/std of 8x8 block DCT coefficients (JPEG full-range YCbCr, "
                       "level shift -128, orthonormal DCT-II, raster frequency index 8u+v).",
        "source": "lfw-aligned-112, identities absent from every fold of pairs.txt",
        "num_images": len(images),
        "num_identities": len({i.split('/')[0] for i in images}),
        "seed": seed,
        "image_list_sha256": listing,
        "std": {c: [float(f"{v:.6g}") for v in stats["std"][i]] for i, c in enumerate(CHANNELS)},
        "mean": {c: [float(f"{v:.6g}") for v in stats["mean"][i]] for i, c in enumerate(CHANNELS)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=STATS_PATH)
    args = parser.parse_args(argv)
    lfw = lfw_dir(args.shared_dir)
    images = sample_images(lfw, args.num_images, args.seed)
    record = build_record(lfw, images, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}: {record['num_images']} images, {record['num_identities']} identities")


if __name__ == "__main__":
    main()
