"""The one training loop every attacker uses: a fixed wall-clock budget, one torch thread, resumable.

Fairness between candidates comes from the budget: every attack on every transform gets the same minutes of
training time (time spent in this loop, data preparation included, summed over resumed sessions). The clock is
wall time by default; on a shared, overloaded CPU `clock="cpu"` counts this process's CPU time instead, so a
busy neighbour does not shrink one candidate's budget more than another's. A
checkpoint (model, optimiser, epoch, position in the epoch, elapsed seconds, loss history) is written every
`checkpoint_every` seconds and at the end, so a killed run continues where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from training_jobs.attacks.data import normaliser, to_unit
from training_jobs.datasets import TransformedFaces


class Attack(Protocol):
    """What the loop needs from an attack: its trainable network and a loss on one batch."""

    @property
    def model(self) -> nn.Module:  # read-only here, so an attack may declare its own network class
        ...

    def loss(self, features: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """features: normalised [B, K, 14, 14]; clean: [B, 3, 112, 112] in [0, 1]."""
        ...


@dataclass
class Budget:
    minutes: float
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: float = 60.0
    max_steps: int | None = None  # tests only: stop early
    clock: str = "wall"  # "wall" (time.perf_counter) or "cpu" (time.process_time of this process)

    def now(self) -> float:
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', not {self.clock!r}")
        return time.perf_counter() if self.clock == "wall" else time.process_time()


@dataclass
class Progress:
    """Where a run stands; saved in the checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    elapsed: float = 0.0  # budget seconds spent (on the budget's clock)
    wall: float = 0.0  # wall seconds spent, whatever the clock
    losses: list[float] = field(default_factory=list)  # mean loss per 10 steps


def save_checkpoint(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer, progress: Progress,
                    meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                "progress": progress.__dict__, "meta": meta}, tmp)
    tmp.replace(path)  # atomic: a kill never leaves a half-written checkpoint


def load_checkpoint(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer | None = None) -> tuple[Progress, dict[str, Any]]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if optimiser is not None:
        optimiser.load_state_dict(state["optimiser"])
    return Progress(**state["progress"]), state["meta"]


def batches(dataset: TransformedFaces, progress: Progress, budget: Budget) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (features, clean) batches in a seeded per-epoch order, starting where `progress` stopped."""
    scale = normaliser(dataset.spec)
    while True:
        dataset.set_epoch(progress.epoch)
        order = np.random.default_rng([budget.seed, progress.epoch]).permutation(len(dataset))
        while progress.position < len(order):
            chosen = order[progress.position:progress.position + budget.batch]
            progress.position += len(chosen)
            samples = [dataset[int(i)] for i in chosen]
            features = torch.stack([s[0] for s in samples]) / scale
            clean = to_unit(torch.stack([s[1] for s in samples]))
            yield features, clean
        progress.epoch += 1
        progress.position = 0


def train(attack: Attack, dataset: TransformedFaces, budget: Budget, checkpoint: Path, meta: dict[str, Any],
          log: Callable[[str], None] | None = None) -> Progress:
    """Train until the budget's minutes (or max_steps) are spent, resuming from `checkpoint` if present."""
    log = log or (lambda message: print(message, flush=True))
    optimiser = torch.optim.AdamW([p for p in attack.model.parameters() if p.requires_grad], lr=budget.lr,
                                  weight_decay=1e-4)
    progress = Progress()
    if checkpoint.exists():
        progress, _ = load_checkpoint(checkpoint, attack.model, optimiser)
        log(f"resumed {checkpoint} at step {progress.step}, {progress.elapsed:.0f} s spent")
    attack.model.train()
    limit = budget.minutes * 60.0
    window: list[float] = []
    started, wall_started = budget.now(), time.perf_counter()
    last_save = wall_started
    spent_before, wall_before = progress.elapsed, progress.wall
    for features, clean in batches(dataset, progress, budget):
        progress.elapsed = spent_before + budget.now() - started
        progress.wall = wall_before + time.perf_counter() - wall_started
        if progress.elapsed >= limit or (budget.max_steps is not None and progress.step >= budget.max_steps):
            break
        loss, parts = attack.loss(features, clean)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        progress.step += 1
        window.append(loss.item())
        if len(window) == 10:
            progress.losses.append(float(np.mean(window)))
            window = []
            log(f"step {progress.step} epoch {progress.epoch} {progress.elapsed:.0f}s loss {progress.losses[-1]:.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in parts.items()))
        if time.perf_counter() - last_save >= budget.checkpoint_every:
            save_checkpoint(checkpoint, attack.model, optimiser, progress, meta)
            last_save = time.perf_counter()
    save_checkpoint(checkpoint, attack.model, optimiser, progress, {**meta, "finished": True})
    attack.model.eval()
    return progress
