"""Training views computed once: augmented faces' clipped features and the teacher's embeddings, cached on disk.

Why: for the small sealed student (inference/sealed_student.py) most of a training step on this CPU is the pixel
teacher's forward pass (MobileFaceNet at 112x112, ~10x the student's work) and the image decoding, augmentation
and block DCT, all repeated for every visit of a face. Here each training image gets `views` augmented versions
(the same `Augment` as `TransformedFaces`, drawn per (seed, view, index)), each stored as its clipped, kept DCT channels (float16, the
precision the SDK sends) with the teacher's embedding of the same augmented face. A training sample is one of an
image's views, picked per (seed, epoch, index), plus a FRESH noise draw at the served calibration, rounded to
float16 as `inference.transform.apply` does: the student sees exactly the served feature distribution, only the
augmentations repeat (8 per image in the runs here; the noise never does).

Samples are (features float32 [K,14,14], teacher embedding float32 [128], label): the trainer distils from the
stored embedding instead of running the teacher (`TEACHER_INCLUDED`).

The cache is a file beside the run (`<out_dir>/views-<key>.npz`), named by what it depends on (images, transform,
augmentation, seed, views, teacher): a resumed run reuses it, a changed config builds a new one.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from inference.lfw import load_rgb
from inference.transform import TransformSpec, add_noise, clipped, release, to_float16
from training_jobs.datasets import EXTRA_SEED_OFFSET, Augment, Split, extra_faces_dir, kept_faces
from training_jobs.hints import HINT_NAMES
from training_jobs.losses import UNLABELLED
from training_jobs.teacher import Teacher

TEACHER_INCLUDED = "teacher_included"  # attribute a dataset sets when its second item is the teacher's embedding
BATCH = 64


def cache_key(images: list[str], spec: TransformSpec, augment: Augment | None, seed: int, views: int,
              teacher: str) -> str:
    """A short digest of everything the cached arrays depend on."""
    described = {"images": images, "transform": spec.transform_id, "augment": asdict(augment) if augment else None,
                 "seed": seed, "views": views, "teacher": teacher}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def build_views(lfw: Path, images: list[str], spec: TransformSpec, augment: Augment | None, seed: int, views: int,
                teacher: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], progress: bool = True) -> dict[str, np.ndarray]:
    """{"features": clipped features float16 [N, views, K, 14, 14], "embeddings": teacher embeddings float32
    [N, views, 128]} and, when the teacher returns its maps too, "hint14"/"hint7" float16 [N, views, C, H, W]."""
    from tqdm import tqdm

    n = len(images)
    arrays: dict[str, np.ndarray] = {}
    jobs = [(index, view) for index in range(n) for view in range(views)]
    for start in tqdm(range(0, len(jobs), BATCH), desc="views", unit="batch", disable=not progress):
        chunk = jobs[start:start + BATCH]
        faces = []
        for index, view in chunk:
            face = load_rgb(lfw, images[index])
            if augment is not None:
                face = augment(face, np.random.default_rng([seed, view, index]))
            faces.append(face)
        batch = np.stack(faces)
        outputs = teacher(torch.from_numpy(batch))
        computed = {"features": to_float16(clipped(batch, spec)), "embeddings": outputs[0].float().cpu().numpy()}
        computed.update({name: out.cpu().numpy().astype(np.float16) for name, out in zip(HINT_NAMES, outputs[1:])})
        for name, values in computed.items():
            if name not in arrays:
                dtype = np.float32 if name == "embeddings" else np.float16
                arrays[name] = np.empty((n, views, *values.shape[1:]), dtype=dtype)
            for row, (index, view) in enumerate(chunk):
                arrays[name][index, view] = values[row]
    assert arrays, "no images"
    return arrays


def load_or_build(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The cached arrays at `path`, built and saved (atomically) when absent."""
    if path.is_file():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, **arrays)  # type: ignore[arg-type]  # numpy stubs let **kwds reach allow_pickle: bool
    partial.replace(path)
    return arrays


class CachedViews(Dataset[tuple[torch.Tensor, Any, int]]):  # Any: a Tensor, or a dict with hints
    """(features float32 [K,14,14] with fresh noise, teacher embedding float32 [128], label) per sample; with hints
    the middle item is {"embedding": [128], "hint14": [128,14,14], "hint7": [128,7,7]} (float32).

    Sources (the labelled images, then unlabelled faces) are kept as separate arrays, each with its own number of
    views: a source of 20,000 extra faces at 8 views would cost an hour of teacher passes and 4 GB, at 2 views a
    quarter of that. The noise draw and the view pick depend on (seed, epoch, index over all sources)."""

    teacher_included = True

    def __init__(self, arrays: dict[str, np.ndarray], labels: list[int], spec: TransformSpec, seed: int = 0) -> None:
        self.sources: list[dict[str, np.ndarray]] = []
        self.starts: list[int] = []
        self.labels: list[int] = []
        self.spec, self.seed, self.epoch = spec, seed, 0
        self.hints = HINT_NAMES[0] in arrays
        self.add_source(arrays, labels)

    def add_source(self, arrays: dict[str, np.ndarray], labels: list[int]) -> None:
        """Append another source's views (any number of views per image; hints in every source or in none)."""
        features, embeddings = arrays["features"], arrays["embeddings"]
        if not len(features) == len(embeddings) == len(labels):
            raise ValueError("features, embeddings and labels differ in length")
        if features.shape[1] != embeddings.shape[1]:
            raise ValueError("features and embeddings differ in their number of views")
        if (HINT_NAMES[0] in arrays) != self.hints:
            raise ValueError("a source without the teacher's maps beside one with them (hints in all or none)")
        self.starts.append(len(self.labels))
        self.sources.append(arrays)
        self.labels += list(labels)

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch: the view and the noise draw depend on it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor], int]:
        source = bisect.bisect_right(self.starts, index) - 1
        arrays = self.sources[source]
        row = index - self.starts[source]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        view = int(rng.integers(arrays["features"].shape[1]))
        noisy = to_float16(release(add_noise(arrays["features"][row, view].astype(np.float64), self.spec, rng),
                                    self.spec, rng))
        embedding = torch.from_numpy(arrays["embeddings"][row, view])
        teacher: torch.Tensor | dict[str, torch.Tensor] = embedding if not self.hints else {"embedding": embedding, **{
            name: torch.from_numpy(arrays[name][row, view].astype(np.float32)) for name in HINT_NAMES}}
        return torch.from_numpy(noisy.astype(np.float32)), teacher, self.labels[index]


def training_views(lfw: Path, split: Split, spec: TransformSpec, augment: Augment | None, config: dict[str, Any],
                   teacher: Teacher, out_dir: Path) -> CachedViews:
    """The training set of a run with `data.cached_views: N`: the split's labelled images, N views each, and with
    `data.extra_faces` the unlabelled faces too, `data.extra_views` views each (default N; label UNLABELLED:
    distillation only; their own cache file, so the labelled images' cache is shared with runs without them).
    With `loss.hint_weight` the teacher's two maps are cached beside its embeddings (training_jobs/hints.py)."""
    if config["teacher"] != "mobilefacenet":
        raise ValueError("data.cached_views stores the teacher's embeddings: it needs teacher: mobilefacenet")
    views, seed = int(config["data"]["cached_views"]), int(config["seed"])
    hints = bool(config["loss"].get("hint_weight"))

    def embed(faces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if hints:
            return teacher.hints(faces)
        result = teacher(faces)
        assert result is not None
        return (result,)

    def cached(folder: Path, images: list[str], images_seed: int, count: int) -> dict[str, np.ndarray]:
        key = cache_key(images, spec, augment, images_seed, count, config["teacher"] + ("+hints" if hints else ""))
        return load_or_build(Path(out_dir) / f"views-{key}.npz", lambda: build_views(
            folder, images, spec, augment, images_seed, count, embed))

    dataset = CachedViews(cached(lfw, split.train_images, seed, views), split.train_labels, spec, seed)
    extra = config["data"].get("extra_faces")
    if extra:
        directory = extra_faces_dir() if extra is True else Path(extra)
        faces = kept_faces(directory)
        if not faces:
            raise ValueError(f"{directory / 'kept.txt'} lists no faces")
        extra_views = views if config["data"].get("extra_views") is None else int(config["data"]["extra_views"])
        if extra_views < 1:
            raise ValueError(f"data.extra_views must be at least 1, not {extra_views}")
        dataset.add_source(cached(directory, faces, seed + EXTRA_SEED_OFFSET, extra_views), [UNLABELLED] * len(faces))
    return dataset
