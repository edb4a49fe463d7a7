"""The simulated device population: one LFW training identity per client, never a held-out identity.

FedFace setting: a client is a phone that holds only its owner's photos. Clients are the identities of
`training_jobs.datasets.make_split` (none appears in the evaluation folds) with at least `min_images`
images; client i sees exactly the images of identity i and nothing else (`ClientData.check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training_jobs.datasets import DEFAULT_EVAL_FOLDS, identity_of, make_split


class IsolationError(AssertionError):
    """A client was about to see an image that is not its owner's, or a held-out identity."""


@dataclass(frozen=True)
class ClientData:
    """One device: its owner's identity and the relative paths (under the LFW folder) of its photos."""

    identity: str
    images: tuple[str, ...]

    def check(self, held_out: frozenset[str] = frozenset()) -> None:
        """Raise IsolationError unless every photo is the owner's and the owner is not held out."""
        if self.identity in held_out:
            raise IsolationError(f"{self.identity} is a held-out identity and may not be a client")
        foreign = [path for path in self.images if identity_of(path) != self.identity]
        if foreign or not self.images:
            raise IsolationError(f"client {self.identity} would see foreign or no images: {foreign[:3]}")


@dataclass(frozen=True)
class Population:
    """All clients of a simulation, in a fixed order: partition-id i is clients[i]."""

    clients: tuple[ClientData, ...]
    held_out: frozenset[str]

    def client(self, partition_id: int) -> ClientData:
        data = self.clients[partition_id]
        data.check(self.held_out)
        return data

    def check(self) -> None:
        """Every client isolated, and no two clients share an identity or an image."""
        names = [c.identity for c in self.clients]
        if len(set(names)) != len(names):
            raise IsolationError("two clients share an identity")
        for data in self.clients:
            data.check(self.held_out)


def make_population(lfw: Path, num_clients: int, min_images: int = 2, max_images: int | None = 4,
                    eval_folds: tuple[int, ...] = DEFAULT_EVAL_FOLDS) -> Population:
    """The first `num_clients` training identities (by name) with >= min_images photos, each capped at max_images.

    Taking identities by name rather than by photo count keeps the population typical (LFW's few identities
    with hundreds of photos would otherwise all be clients).
    """
    split = make_split(lfw, eval_folds, min_images=min_images)
    by_identity: dict[str, list[str]] = {}
    for path in split.train_images:
        by_identity.setdefault(identity_of(path), []).append(path)
    names = sorted(by_identity)[:num_clients]
    if len(names) < num_clients:
        raise ValueError(f"only {len(names)} training identities have >= {min_images} images")
    clients = tuple(ClientData(name, tuple(by_identity[name][:max_images])) for name in names)
    population = Population(clients, split.eval_identities)
    population.check()
    return population
