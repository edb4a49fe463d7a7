"""One client's local training WITHOUT labels (unsupervised mode); pure torch, no Flower.

The device has photos of its owner but is told nothing about them (no identity, no class vector, which is also
why a device with a single photo can take part). Per batch of the owner's photos:
- two views of each photo: independent augmentation AND independent served noise, each through
  `TransformSpec.apply` (the SDK's features); agreement loss 1 - cos(e1, e2): the embedding must not depend on
  pose jitter, lighting or the noise draw;
- distillation 1 - cos(e, g) towards the round's starting global model (frozen on the device) on the same
  features: agreement alone has a trivial optimum (map everything to one point); the frozen global model keeps
  the embedding space where it was and only lets it move where the views disagree;
- with impostor features (`impostors.ImpostorSource`), a negative term mean(relu(cos(e, g_k) - m)^2) that
  pushes both views away from the impostors' embeddings: the contrastive half a one-identity device lacks.
Nothing identity-specific leaves the device besides the model update (no class vector is returned).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from inference.frequency_model import FrequencyFaceModel
from inference.transform import TransformSpec, apply
from training_jobs.datasets import Augment
from training_jobs.federated.impostors import ImpostorSource, negative_margin_loss
from training_jobs.federated.local import LocalConfig, LocalResult, local_optimizer, local_step, raw_embedding


def two_views(faces: np.ndarray, spec: TransformSpec, augment: Augment | None, batch_size: int,
              rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(view 1, view 2) feature batches over one shuffled pass: fresh augmentation and noise for each view."""
    order = rng.permutation(len(faces))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        views = []
        for _ in range(2):
            clean = np.stack([augment(faces[i], rng) if augment else faces[i] for i in chosen])
            views.append(torch.from_numpy(apply(clean, spec, rng).astype(np.float32)))
        yield views[0], views[1]


class FrozenGlobal:
    """The round's starting model as a frozen function: a snapshot of its parameters evaluated with
    `functional_call`, so the device needs no second copy of the module (the model itself trains in place)."""

    def __init__(self, model: FrequencyFaceModel) -> None:
        self.model = model
        self.parameters = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The starting model's raw embedding (no flip averaging), the same function `raw_embedding` trains."""
        image = functional_call(self.model.adapter, _prefixed(self.parameters, "adapter."), (features,))
        embedding: torch.Tensor = functional_call(self.model.backbone, _prefixed(self.parameters, "backbone."),
                                                  (image,))
        return embedding


def _prefixed(parameters: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value for name, value in parameters.items() if name.startswith(prefix)}


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(a_i, b_i))."""
    return (1.0 - F.cosine_similarity(a, b, dim=1)).mean()


def train_unsupervised(model: FrequencyFaceModel, faces: np.ndarray, spec: TransformSpec, config: LocalConfig,
                       rng: np.random.Generator, impostors: ImpostorSource | None = None,
                       augment: Augment | None = Augment()) -> LocalResult:
    """Train the model's parameters that require grad, in place, on ONE device's unlabelled photos."""
    frozen = FrozenGlobal(model)
    optimizer = local_optimizer(model, config)
    model.eval()  # BatchNorm frozen, as in the supervised mode
    sums, count = np.zeros(4), 0
    for _ in range(config.epochs):
        for view1, view2 in two_views(faces, spec, augment, config.batch_size, rng):
            e1, e2 = raw_embedding(model, view1), raw_embedding(model, view2)
            agreement = cosine_distance(e1, e2)
            distill = 0.5 * (cosine_distance(e1, frozen(view1)) + cosine_distance(e2, frozen(view2)))
            impostor = torch.zeros(())
            if impostors is not None and config.impostor_weight > 0:
                negatives = raw_embedding(model, impostors.sample(config.impostors_per_batch, rng))
                impostor = negative_margin_loss(torch.cat([e1, e2]), negatives, config.impostor_margin)
            loss = (config.agreement_weight * agreement + config.global_distill_weight * distill
                    + config.impostor_weight * impostor)
            local_step(optimizer, loss, config.grad_clip)
            sums += len(view1) * np.array([loss.item(), agreement.item(), distill.item(), impostor.item()])
            count += len(view1)
    mean = sums / max(count, 1)
    return LocalResult(None, len(faces), float(mean[0]), float(mean[1]), float(mean[2]), float(mean[3]))
