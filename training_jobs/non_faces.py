"""The non-faces of the quality gate's fit and evaluation (`training_jobs/quality_gate.py`): synthetic pixel
frames, non-faces made from held-out faces, and feature-level inputs that never were an image.

Each maker says in its docstring what it stands for and whether it is used in the fit, only held out for the
evaluation, or informational; the draws come from the caller's seeded generator, so a run is repeatable.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from inference.lfw import load_rgb
from inference.feature_checks import validation_bounds
from inference.transform import FACE_SIZE, TransformSpec

Images = np.ndarray  # uint8 [n, 112, 112, 3]


# --- pixel non-faces ------------------------------------------------------------------------------------

def grey(rng: np.random.Generator, n: int) -> Images:
    """Flat frames: black, white, every grey level, and flat colours (one in four)."""
    level = rng.integers(0, 256, size=(n, 1, 1, 1))
    colour = rng.integers(0, 256, size=(n, 1, 1, 3))
    flat = np.where(rng.random((n, 1, 1, 1)) < 0.25, colour, level)
    return np.broadcast_to(flat, (n, FACE_SIZE, FACE_SIZE, 3)).astype(np.uint8)


def uniform_noise(rng: np.random.Generator, n: int) -> Images:
    lo = rng.integers(0, 200, size=(n, 1, 1, 1))
    hi = lo + rng.integers(20, 256 - lo + 1)
    return rng.integers(lo, hi, size=(n, FACE_SIZE, FACE_SIZE, 3)).astype(np.uint8)


def gaussian_noise(rng: np.random.Generator, n: int) -> Images:
    mean = rng.uniform(30, 225, size=(n, 1, 1, 1))
    std = rng.uniform(2, 80, size=(n, 1, 1, 1))
    grey_only = rng.random((n, 1, 1, 1)) < 0.5
    noise = rng.normal(0, 1, size=(n, FACE_SIZE, FACE_SIZE, 3))
    noise = np.where(grey_only, noise[..., :1], noise)
    return np.clip(np.rint(mean + std * noise), 0, 255).astype(np.uint8)


def gradient(rng: np.random.Generator, n: int) -> Images:
    """Linear ramps in a random direction between two random colours."""
    yy, xx = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE] / (FACE_SIZE - 1)
    angle = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    a, b = rng.uniform(0, 255, size=(2, n, 1, 1, 3))
    result: np.ndarray = np.clip(np.rint(a + (b - a) * t[..., None]), 0, 255).astype(np.uint8)
    return result


def blurred_noise(rng: np.random.Generator, n: int) -> Images:
    noise = uniform_noise(rng, n)
    return np.stack([cv2.GaussianBlur(img, (0, 0), rng.uniform(1, 6)) for img in noise])


def pink_noise(rng: np.random.Generator, n: int) -> Images:
    """Noise with a natural image's 1/f^a amplitude spectrum (a in [1, 2]): photo-like statistics, no face."""
    fy = np.fft.fftfreq(FACE_SIZE)[:, None]
    fx = np.fft.rfftfreq(FACE_SIZE)[None, :]
    radius = np.maximum(np.hypot(fy, fx), 1.0 / FACE_SIZE)
    out = []
    for _ in range(n):
        spectrum = radius ** -rng.uniform(1, 2) * np.exp(2j * np.pi * rng.random((3, *radius.shape)))
        field = np.fft.irfft2(spectrum, s=(FACE_SIZE, FACE_SIZE))
        field = (field - field.mean()) / field.std()
        out.append(np.moveaxis(rng.uniform(60, 200) + rng.uniform(10, 60) * field, 0, -1))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def gratings(rng: np.random.Generator, n: int) -> Images:
    """Held out: sinusoidal gratings and checkerboards of random period and orientation."""
    yy, xx = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE].astype(np.float64)
    out = []
    for _ in range(n):
        period, angle = rng.uniform(3, 40), rng.uniform(0, np.pi)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        v = -np.sin(angle) * xx + np.cos(angle) * yy
        wave = np.sin(2 * np.pi * u / period)
        if rng.random() < 0.5:
            wave = np.sign(wave * np.sin(2 * np.pi * v / period))
        out.append(rng.uniform(80, 170) + rng.uniform(20, 80) * wave)
    return np.repeat(np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def salt_and_pepper(rng: np.random.Generator, n: int) -> Images:
    """Held out: a flat frame with sparse black and white impulses."""
    img = grey(rng, n).copy()
    density = rng.uniform(0.005, 0.1, size=(n, 1, 1))
    hits = rng.random((n, FACE_SIZE, FACE_SIZE)) < density
    img[hits] = np.where(rng.random((int(hits.sum()), 1)) < 0.5, 0, 255)
    return img


def shapes(rng: np.random.Generator, n: int) -> Images:
    """Held out: cartoons of random rectangles, circles and lines (edges, no face)."""
    out = []
    for _ in range(n):
        img = np.full((FACE_SIZE, FACE_SIZE, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(rng.integers(2, 9)):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            p, q = rng.integers(0, FACE_SIZE, 2), rng.integers(0, FACE_SIZE, 2)
            kind = rng.integers(3)
            if kind == 0:
                cv2.rectangle(img, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, -1)
            elif kind == 1:
                cv2.circle(img, tuple(int(v) for v in p), int(rng.integers(4, 40)), colour, -1)
            else:
                cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, int(rng.integers(1, 6)))
        out.append(img)
    return np.stack(out)


# --- non-faces made from held-out faces (evaluation only) -------------------------------------------------

def blurred_faces(faces: Images, rng: np.random.Generator) -> Images:
    """Held out: faces blurred (sigma 5-8 px) until no feature of a face is left."""
    return np.stack([cv2.GaussianBlur(f, (0, 0), rng.uniform(5, 8)) for f in faces])


def background_crops(raw_dir: Path, rng: np.random.Generator, n: int) -> Images:
    """Held out, natural non-faces: 64x64 corners of raw (unaligned) LFW fold-1 photos, resized to 112."""
    photos = sorted(raw_dir.glob("*/*.jpg"))
    out = []
    for i in rng.choice(len(photos), size=min(n, len(photos)), replace=False):
        img = load_rgb(raw_dir, photos[i].relative_to(raw_dir).as_posix())  # any LFW photo, not only aligned ones
        y, x = [(0, 0), (0, img.shape[1] - 64), (img.shape[0] - 64, 0), (img.shape[0] - 64, img.shape[1] - 64)][
            rng.integers(4)]
        out.append(cv2.resize(img[y:y + 64, x:x + 64], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_CUBIC))
    return np.stack(out)


def rolled(faces: Images, rng: np.random.Generator) -> Images:
    """Held out: faces cyclically shifted by 20-92 px on both axes: a face's texture, its parts in wrong places."""
    return np.stack([np.roll(f, tuple(rng.integers(20, 93, 2)), axis=(0, 1)) for f in faces])


def masked_faces(faces: Images) -> Images:
    """Informational: eyes and mouth covered by mid-grey boxes (a face that is partly hidden)."""
    out = faces.copy()
    for (x0, y0, x1, y1) in ((26, 40, 86, 62), (32, 84, 80, 102)):
        out[:, y0:y1, x0:x1] = 128
    return out


def upside_down(faces: Images) -> Images:
    """Informational: the face rotated 180 degrees (a face, but not aligned)."""
    return np.ascontiguousarray(faces[:, ::-1, ::-1])


def low_contrast(faces: Images) -> Images:
    """Informational: contrast x0.3 around the mean (a dim, flat photo of a real face)."""
    x = faces.astype(np.float64)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    result: np.ndarray = np.clip(np.rint(mean + 0.3 * (x - mean)), 0, 255).astype(np.uint8)
    return result


# --- feature-level non-faces -------------------------------------------------------------------------------

def constants(rng: np.random.Generator, n: int, spec: TransformSpec) -> np.ndarray:
    """Every value the same constant, within the transform's validation bounds."""
    bound = float(validation_bounds(spec).min())
    value = rng.uniform(-bound, bound, size=(n, 1, 1, 1))
    return np.broadcast_to(value, (n, *spec.shape)).astype(np.float16)


def zeros(n: int, spec: TransformSpec) -> np.ndarray:
    return np.zeros((n, *spec.shape), np.float16)


def noise_features(rng: np.random.Generator, n: int, spec: TransformSpec) -> np.ndarray:
    """Laplace noise at 0.5-4x the transform's own noise scale and nothing else."""
    scale = spec.noise_scales()[:, None, None] * rng.uniform(0.5, 4, size=(n, 1, 1, 1))
    return rng.laplace(0, np.broadcast_to(scale, (n, *spec.shape))).astype(np.float16)


def spectrum_matched(rng: np.random.Generator, n: int, spec: TransformSpec) -> np.ndarray:
    """Held out: Gaussian features with each channel at a face's std: a face's spectrum, no face's layout."""
    scale = np.asarray(spec.channel_std)[:, None, None] * rng.uniform(0.3, 1.5, size=(n, 1, 1, 1))
    return rng.normal(0, np.broadcast_to(scale, (n, *spec.shape))).astype(np.float16)


def block_shuffled(features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Held out: a held-out face's features with its 196 blocks permuted: every statistic of the face but where."""
    flat = features.reshape(*features.shape[:-2], -1)
    return np.stack([f[:, rng.permutation(flat.shape[-1])] for f in flat]).reshape(features.shape)
