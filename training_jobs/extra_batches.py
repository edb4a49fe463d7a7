"""Batches of a run with unlabelled extra faces: every labelled sample a plain run would see, plus extras on top.

Why: with `data.extra_faces` alone the labelled images and the extra faces are shuffled together, so with 22,329
extras beside 6,922 labelled images three samples in four carry no label and the margin head sees a quarter of the
labelled samples of a run without them (cpu-low12-faces, docs/models/presets.md). `data.extra_per_batch: N` keeps
each batch's `batch_size` labelled samples, one shuffled pass over the labelled images per epoch as in a plain run,
and adds N extra faces, so the margin head sees as many labelled samples as in the same run without extras and the
only change is the distillation on more people (at N/batch_size more compute per step).

The labelled order is a shuffle of the labelled indices; the extras are a separate shuffle that wraps around when
the labelled pass is longer than the extras last. Both come from a torch generator seeded per epoch: this is
training randomness, not protection of any data, so it need not come from the OS.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class LabelledPlusExtraBatches(Sampler[list[int]]):
    """Index batches over ConcatDataset([labelled, extra]): `batch_size` labelled indices then `extra` indices
    (offset by `labelled`) per batch; one pass over the labelled images per epoch."""

    def __init__(self, labelled: int, extras: int, batch_size: int, extra: int, seed: int) -> None:
        if labelled < 1 or extras < 1 or batch_size < 1 or extra < 1:
            raise ValueError("labelled, extras, batch_size and extra must all be >= 1")
        self.labelled, self.extras, self.batch_size, self.extra, self.seed = labelled, extras, batch_size, extra, seed

    def __len__(self) -> int:
        return math.ceil(self.labelled / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.labelled, generator=generator).tolist()
        extra_order = torch.randperm(self.extras, generator=generator).tolist()
        for batch, start in enumerate(range(0, self.labelled, self.batch_size)):
            first = batch * self.extra
            extras = [self.labelled + extra_order[(first + i) % self.extras] for i in range(self.extra)]
            yield order[start:start + self.batch_size] + extras
