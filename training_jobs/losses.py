"""Margin-based identity heads (CosFace, ArcFace) and embedding distillation.

- Unlabelled samples (label UNLABELLED = -1: extra faces used for distillation only) take no part in the margin
  loss, which averages over the labelled samples of the batch (0 when there are none).
- CosFace (Wang et al. 2018): logit_y = s * (cos θ_y - m), other logits s * cos θ_j.
- ArcFace (Deng et al. 2019): logit_y = s * cos(θ_y + m) (with the usual fallback cos θ - m sin(m) m when
  θ + m > π, keeping the logit monotonic).
- Distillation: 1 - cos(student, teacher), averaged; the teacher is detached. When the teacher's embedding
  space is not the student's (SFace teaching a MobileFaceNet student), a learned linear projection maps the
  student embedding first (`DistillationLoss(project_from=128, project_to=128)`).
- Relation distillation (similarity-preserving, Tung & Mori 2019): the batch's cosine-similarity matrix of the
  student against the teacher's, mean squared difference over the off-diagonal pairs. It asks only that faces
  stand to each other as the teacher sees them, not that each embedding sits where the teacher's does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

UNLABELLED = -1


class MarginHead(nn.Module):
    """Normalised class centres [C, d] and a margin on the target logit; returns (loss, logits)."""

    def __init__(self, embedding_dim: int, num_classes: int, kind: str = "cosface", scale: float = 32.0,
                 margin: float = 0.35) -> None:
        super().__init__()
        if kind not in ("cosface", "arcface"):
            raise ValueError(f"margin head must be 'cosface' or 'arcface', not {kind!r}")
        self.kind = kind
        self.scale = scale
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    @torch.no_grad()
    def init_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Centre of each class = mean of its (normalised) embeddings; classes without samples keep theirs."""
        embeddings = F.normalize(embeddings.float(), dim=1)
        sums = torch.zeros_like(self.weight).index_add_(0, labels, embeddings.to(self.weight.device))
        counts = torch.bincount(labels, minlength=self.weight.shape[0])
        seen = counts > 0
        self.weight[seen] = F.normalize(sums[seen], dim=1)

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1)).clamp(-1, 1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cosines(embeddings)
        safe = labels.clamp_min(0)  # unlabelled rows get a dummy target, then leave the loss
        target = cos.gather(1, safe[:, None])
        if self.kind == "cosface":
            adjusted = target - self.margin
        else:
            sin = torch.sqrt((1.0 - target * target).clamp_min(1e-7))
            with_margin = target * math.cos(self.margin) - sin * math.sin(self.margin)
            threshold = math.cos(math.pi - self.margin)
            adjusted = torch.where(target > threshold, with_margin, target - math.sin(math.pi - self.margin) * self.margin)
        logits = cos.scatter(1, safe[:, None], adjusted) * self.scale
        known = labels != UNLABELLED
        if not bool(known.any()):
            return logits.sum() * 0.0, cos  # keeps the graph (and the device) of a real loss
        return F.cross_entropy(logits[known], labels[known]), cos


class DistillationLoss(nn.Module):
    """Mean (1 - cosine) between student and (detached) teacher embeddings, optional linear projection."""

    def __init__(self, project_from: int | None = None, project_to: int | None = None) -> None:
        super().__init__()
        self.projection = None
        if project_from is not None:
            self.projection = nn.Linear(project_from, project_to or project_from, bias=False)
            if (project_to or project_from) == project_from:
                nn.init.eye_(self.projection.weight)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            student = self.projection(student)
        return (1.0 - F.cosine_similarity(student, teacher.detach().to(student.dtype), dim=1)).mean()


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the batch's pairwise cosine similarities, student vs (detached) teacher,
    over the off-diagonal pairs (the diagonal is 1 for both). Invariant to any rotation of either embedding
    space, so it constrains what the embedding-wise term cannot: the geometry between different faces."""
    if student.shape[0] < 2:
        return student.sum() * 0.0
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher.detach().to(student.dtype), dim=1)
    difference = s @ s.T - t @ t.T
    off_diagonal = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
    return (difference[off_diagonal] ** 2).mean()
