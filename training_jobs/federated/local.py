"""One client's local training on its own photos (FedFace, supervised mode); pure torch, no Flower.

The device computes the SAME features the SDK sends (`TransformSpec.apply` with the served noise, after the
training augmentation) and trains the travelling part of the served model with:
- a positive margin loss towards its OWN class vector w (the only class it knows; FedAwS/FedFace):
  mean(relu(m - cos(e, w))^2) — pulls its embeddings within cosine m of w. Negatives come from the server's
  spread-out regulariser on all class vectors (`spreadout`), not from the device;
- distillation (1 - cos) towards the frozen pixel-domain MobileFaceNet on the same clean augmented photo,
  which the device has: it keeps the embedding space of the base model and stops the one-class collapse.
With GAN impostor features (impostors.py) the class vector is also pushed away from their embeddings, and
the unsupervised mode (unsupervised.py, `mode` in the round's config) trains without any label.
The class vector starts as the mean embedding of the owner's photos under the received model when the
server has none for this client yet, and is trained with the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.frequency_model import FrequencyFaceModel
from inference.mobilefacenet import MobileFaceNet
from inference.transform import TransformSpec, apply
from training_jobs.datasets import Augment
from training_jobs.evaluate import pixel_input
from training_jobs.federated.impostors import ImpostorSource, negative_margin_loss
from training_jobs.federated.mixup import Mixer, MixupConfig
from training_jobs.losses import DistillationLoss

MODES = ("supervised", "unsupervised")


@dataclass(frozen=True)
class LocalConfig:
    """Local training knobs sent by the server in the round's config."""

    epochs: int = 1
    batch_size: int = 4
    lr: float = 5e-4
    adapter_lr: float = 1e-4
    class_lr: float = 1e-2
    identity_weight: float = 1.0
    distill_weight: float = 1.0
    positive_margin: float = 0.8
    grad_clip: float = 5.0
    mode: str = "supervised"  # or "unsupervised" (unsupervised.py): no labels, no class vector
    impostors_per_batch: int = 4  # GAN impostor features per batch, when the round ships a generator
    impostor_weight: float = 1.0
    impostor_margin: float = 0.2  # impostors are pushed below this cosine
    agreement_weight: float = 1.0  # unsupervised: two views agree
    global_distill_weight: float = 1.0  # unsupervised: stay near the round's starting global model
    mixup_k: int = 0  # >= 2: train on mixes of k of the owner's feature maps (mixup.py); 0: off
    mixup_adaptive: bool = False  # weights from the adversarial strategy network, else floored Dirichlet


@dataclass(frozen=True)
class LocalResult:
    class_vector: np.ndarray | None  # [d], L2-normalised; None in the unsupervised mode (no identity)
    num_examples: int  # photos of this client (the FedAvg weight)
    loss: float
    identity: float  # supervised: the margin loss to the class vector; unsupervised: the views' disagreement
    distill: float  # supervised: to the pixel teacher; unsupervised: to the round's starting global model
    impostor: float = 0.0  # the negative term against GAN impostor features (0 without them)


def positive_margin_loss(embeddings: torch.Tensor, class_vector: torch.Tensor, margin: float) -> torch.Tensor:
    """mean(relu(margin - cos(e, w))^2): the one-class margin loss of FedAwS."""
    cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(class_vector, dim=0)[None]).squeeze(1)
    return F.relu(margin - cos).pow(2).mean()


def raw_embedding(model: FrequencyFaceModel, features: torch.Tensor) -> torch.Tensor:
    """One view, un-normalised: what the losses see (as in training_jobs.train)."""
    result: torch.Tensor = model.backbone(model.adapter(features))
    return result


@torch.no_grad()
def initial_class_vector(model: FrequencyFaceModel, faces: np.ndarray, spec: TransformSpec,
                         rng: np.random.Generator) -> np.ndarray:
    """Mean (normalised) embedding of the owner's photos under the received model."""
    model.eval()
    features = torch.from_numpy(apply(faces, spec, rng).astype(np.float32))
    return F.normalize(F.normalize(model(features), dim=1).mean(0), dim=0).numpy()


def batches(faces: np.ndarray, spec: TransformSpec, augment: Augment | None, batch_size: int,
            rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(features, clean) batches over one shuffled pass; every visit gets fresh augmentation and noise."""
    order = rng.permutation(len(faces))
    for start in range(0, len(order), batch_size):
        clean = np.stack([augment(faces[i], rng) if augment else faces[i] for i in order[start:start + batch_size]])
        yield torch.from_numpy(apply(clean, spec, rng).astype(np.float32)), clean


def local_optimizer(model: FrequencyFaceModel, config: LocalConfig, *extra: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW over what trains on the device, in both modes: the backbone's travelling parameters at `lr`, the
    `extra` groups (the supervised mode's class vector), then the adapter's at `adapter_lr`, neither decayed."""
    adapter = [p for p in model.adapter.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": backbone, "lr": config.lr}, *extra]
    if adapter:
        groups.append({"params": adapter, "lr": config.adapter_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, weight_decay=5e-4)


def local_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One update: gradients of `loss`, clipped to `grad_clip` in L2 over every parameter the optimizer holds."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()


def train_local(model: FrequencyFaceModel, teacher: MobileFaceNet, faces: np.ndarray, spec: TransformSpec,
                class_vector: np.ndarray | None, config: LocalConfig, rng: np.random.Generator,
                augment: Augment | None = Augment(), impostors: ImpostorSource | None = None) -> LocalResult:
    """Train the model's parameters that require grad, in place, on ONE identity's photos (the round's mode)."""
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {config.mode!r}")
    if config.mode == "unsupervised":  # imported here: unsupervised.py builds on this module
        from training_jobs.federated.unsupervised import train_unsupervised
        return train_unsupervised(model, faces, spec, config, rng, impostors, augment)
    if class_vector is None:
        class_vector = initial_class_vector(model, faces, spec, rng)
    w = nn.Parameter(torch.as_tensor(class_vector, dtype=torch.float32).clone())
    optimizer = local_optimizer(model, config, {"params": [w], "lr": config.class_lr, "weight_decay": 0.0})
    distill = DistillationLoss()
    model.eval()  # BatchNorm frozen: a device has far too few photos for batch statistics
    mixer = (Mixer(MixupConfig(config.mixup_k, config.mixup_adaptive), spec.num_channels,
                   int(rng.integers(2**62))) if config.mixup_k >= 2 else None)

    def losses(features: torch.Tensor, clean: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = raw_embedding(model, features)
        identity = positive_margin_loss(embedding, w, config.positive_margin)
        with torch.no_grad():
            target = teacher(pixel_input(clean))
        kd = distill(embedding, target)
        return config.identity_weight * identity + config.distill_weight * kd, identity, kd

    sums, count = np.zeros(4), 0
    for _ in range(config.epochs):
        for features, clean in batches(faces, spec, augment, config.batch_size, rng):
            if mixer is not None:  # the update only ever sees mixes of k photos
                features, clean = mixer(features, clean, lambda f, c: losses(f, c)[0])
            loss, identity, kd = losses(features, clean)
            impostor = torch.zeros(())
            if impostors is not None and config.impostor_weight > 0:  # push the class vector off the impostors
                negatives = raw_embedding(model, impostors.sample(config.impostors_per_batch, rng))
                impostor = negative_margin_loss(w[None], negatives, config.impostor_margin)
                loss = loss + config.impostor_weight * impostor
            local_step(optimizer, loss, config.grad_clip)
            sums += len(clean) * np.array([loss.item(), identity.item(), kd.item(), impostor.item()])
            count += len(clean)
    mean = sums / max(count, 1)
    vector = F.normalize(w.detach(), dim=0).numpy().astype(np.float32)
    return LocalResult(vector, len(faces), float(mean[0]), float(mean[1]), float(mean[2]), float(mean[3]))
