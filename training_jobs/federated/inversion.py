"""Gradient inversion of one client's FedAvg update: what an honest-but-curious server can rebuild.

Threat: with FedAvg the server receives each client's updated parameters and class vector. It knows the global
parameters it sent, the class vector it sent, the local config (learning rates, one local epoch) and the
number of photos (the FedAvg weight). A device with <= batch-size photos makes ONE AdamW step, and Adam's first
step moves each parameter by lr * g / (|g| + eps) = lr * sign(g) (decoupled weight decay adds lr * wd * θ,
~2.5e-7 θ here, negligible). So sign(before - after) is the sign of the client's gradient, for every
travelling parameter and the class vector.

Attack ("Inverting Gradients", Geiping et al. 2020, adapted to sign observations): optimise n feature maps F̂
(in units of the transform's per-channel std, clamped to its clip bound) and n free teacher embeddings t̂
(the distillation target, which the server cannot compute without the photo) so that the gradient of the
client's own loss at (F̂, t̂) points the same way as the observed signs, layer by layer (mean over tensors of
1 - cos(g, sign)), plus a small total-variation prior on F̂. This needs a second-order backward through the
model. The recovered maps are turned into pixels by the project's learned feature -> image inverter (A1,
training_jobs/attacks) in `inversion_bench.py`.

Under MixUp (`mixup.py`) the same attack recovers (at best) the MIXES the client trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from inference.frequency_model import FrequencyFaceModel
from inference.transform import TransformSpec
from training_jobs.federated.local import LocalConfig, positive_margin_loss, raw_embedding

CLASS = "class-vector"


@dataclass(frozen=True)
class ObservedUpdate:
    """What the server holds for one client's round: what it sent and what came back."""

    before: dict[str, np.ndarray]  # the global travelling parameters sent
    after: dict[str, np.ndarray]  # the client's reply
    class_before: np.ndarray
    class_after: np.ndarray
    num_examples: int

    def signs(self) -> dict[str, torch.Tensor]:
        """sign(before - after): the sign of the client's gradient under one Adam step (0 where unchanged)."""
        out = {name: torch.from_numpy(np.sign(self.before[name] - self.after[name]).astype(np.float32))
               for name in self.before}
        out[CLASS] = torch.from_numpy(np.sign(self.class_before - self.class_after).astype(np.float32))
        return out


@dataclass(frozen=True)
class InversionConfig:
    steps: int = 200
    lr: float = 0.05
    tv_weight: float = 1e-2
    seed: int = 0
    match: tuple[str, ...] = ()  # name prefixes of the tensors to match ("adapter.": the first layer); () = all


@dataclass
class InversionResult:
    features: np.ndarray  # [n, K, 14, 14], the transform's units
    teacher: np.ndarray  # [n, d], the recovered distillation targets (unit)
    losses: list[float] = field(default_factory=list)


def client_gradients(model: FrequencyFaceModel, names: list[str], features: torch.Tensor, teacher: torch.Tensor,
                     class_vector: torch.Tensor, config: LocalConfig, create_graph: bool) -> list[torch.Tensor]:
    """Gradient of the client's loss (local.train_local's, with `teacher` as the distillation target) w.r.t.
    the travelling parameters (in `names` order) and the class vector (last)."""
    params = dict(model.named_parameters())
    w = class_vector.clone().requires_grad_(True)
    embedding = raw_embedding(model, features)
    identity = positive_margin_loss(embedding, w, config.positive_margin)
    kd = (1.0 - F.cosine_similarity(embedding, teacher, dim=1)).mean()
    loss = config.identity_weight * identity + config.distill_weight * kd
    return list(torch.autograd.grad(loss, [params[n] for n in names] + [w], create_graph=create_graph))


def sign_mismatch(grads: list[torch.Tensor], signs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over tensors of 1 - cos(g, sign): 0 when every gradient is proportional to the observed signs."""
    terms = [1.0 - F.cosine_similarity(g.flatten(), s.flatten(), dim=0, eps=1e-12)
             for g, s in zip(grads, signs) if s.abs().sum() > 0]
    return torch.stack(terms).mean()


def total_variation(z: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring blocks of every feature plane."""
    return (z[..., 1:, :] - z[..., :-1, :]).abs().mean() + (z[..., :, 1:] - z[..., :, :-1]).abs().mean()


def invert_update(model: FrequencyFaceModel, update: ObservedUpdate, spec: TransformSpec, local: LocalConfig,
                  config: InversionConfig = InversionConfig(), count: int | None = None,
                  prior: np.ndarray | None = None) -> InversionResult:
    """Recover `count` (default: the client's number of photos) feature maps from one observed update.

    `model` must hold the parameters the server sent (`update.before`); it is used in eval mode, its
    parameters are not changed. `prior` ([K, 14, 14], e.g. the mean features of public faces) is where the
    search starts, plus a little seeded noise; without it the start is random."""
    model.eval()
    names = list(update.before)
    for name, p in model.named_parameters():
        p.requires_grad_(name in update.before)
    observed = update.signs()
    matched = [i for i, name in enumerate(names + [CLASS]) if not config.match or name.startswith(config.match)]
    signs = [observed[n] for n in names] + [observed[CLASS]]
    signs = [signs[i] for i in matched]
    n = count or update.num_examples
    generator = torch.Generator().manual_seed(config.seed)
    std = torch.tensor(spec.channel_std, dtype=torch.float32).view(1, -1, 1, 1)
    z = 0.5 * torch.randn(n, spec.num_channels, *spec.shape[1:], generator=generator)
    if prior is not None:
        z = 0.1 * z + torch.as_tensor(prior, dtype=torch.float32)[None] / std
    z.requires_grad_(True)
    w = torch.as_tensor(update.class_before, dtype=torch.float32)
    t = (F.normalize(w, dim=0).repeat(n, 1) + 0.1 * torch.randn(n, len(w), generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([z, t], lr=config.lr)
    bound = spec.clip_sigmas
    losses = []
    for _ in range(config.steps):
        grads = client_gradients(model, names, z * std, t, w, local, create_graph=True)
        loss = sign_mismatch([grads[i] for i in matched], signs) + config.tv_weight * total_variation(z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            z.clamp_(-bound, bound)
        losses.append(float(loss.item()))
    for p in model.parameters():
        p.grad = None
    return InversionResult((z.detach() * std).numpy(), F.normalize(t.detach(), dim=1).numpy(), losses)


def best_cosines(recovered: np.ndarray, true: np.ndarray, spec: TransformSpec, unit: bool = True) -> np.ndarray:
    """For every true map [m, K, 14, 14]: the best cosine with any recovered map, in unit-std units (every
    channel counts alike) or, unit=False, in the transform's units (low frequencies, larger, dominate)."""
    std = np.asarray(spec.channel_std, dtype=np.float64).reshape(1, -1, 1, 1) if unit else 1.0
    a = (recovered / std).reshape(len(recovered), -1)
    b = (true / std).reshape(len(true), -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    result: np.ndarray = (b @ a.T).max(axis=1)
    return result
