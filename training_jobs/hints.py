"""Hint distillation for the sealed student: its two stage maps learn to predict the pixel teacher's maps.

Why (issue 12, docs/sealed.md): trained on the teacher's final embedding alone, the four-layer sealed student stays
0.51-0.57 (1 - cos) from the teacher on held-out faces whatever its width, steps or extra faces; the teacher's
intermediate maps say HOW it gets there, a far richer signal per face than 128 numbers ("FitNets", Romero et al.
2015). The student's 14x14 and 7x7 grids are the teacher's own at the end of its 14x14 and 7x7 stages (the 8x8 DCT
blocks tile the 112x112 face as those stages' cells do), so the maps align position by position.

- The teacher's maps: MobileFaceNet's output after `features[HINT_BLOCKS[0]]` (128 x 14 x 14, the last 14x14 block)
  and after the last block (128 x 7 x 7), captured by forward hooks, so the teacher's code stays as it is and its
  ONNX export (training_jobs/teacher.py) simply gains two outputs.
- A regressor per stage, a 1x1 convolution from the student's channels to the teacher's, trained with the heads and
  dropped at export (it is not part of the served model, nor of its MPC cost).
- The loss per stage: 1 - cos between the flattened regressed student map and the teacher's, averaged over the
  batch: the same form and scale as the embedding term, and blind to the teacher map's overall scale.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from inference.mobilefacenet import MobileFaceNet
from inference.sealed_student import SealedCnn

HINT_BLOCKS = (11, 14)  # MobileFaceNet.features indices: the last 14x14 block, the last 7x7 block
HINT_SHAPES = ((128, 14, 14), (128, 7, 7))
HINT_NAMES = ("hint14", "hint7")


class TeacherWithHints(nn.Module):
    """The frozen teacher returning (raw embedding [B,128], map 14x14 [B,128,14,14], map 7x7 [B,128,7,7])."""

    def __init__(self, teacher: MobileFaceNet) -> None:
        super().__init__()
        self.teacher = teacher
        self._maps: dict[int, torch.Tensor] = {}
        for index in HINT_BLOCKS:
            teacher.features[index].register_forward_hook(self._keeper(index))

    def _keeper(self, index: int) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            self._maps[index] = output
        return keep

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.teacher(faces)
        return embedding, self._maps.pop(HINT_BLOCKS[0]), self._maps.pop(HINT_BLOCKS[1])


class HintLoss(nn.Module):
    """Mean over the two stages of mean over the batch of 1 - cos(regressor(student map), teacher map)."""

    def __init__(self, student_channels: tuple[int, int]) -> None:
        super().__init__()
        self.regressors = nn.ModuleList(nn.Conv2d(cin, shape[0], 1, bias=False)
                                        for cin, shape in zip(student_channels, HINT_SHAPES))

    def forward(self, student_maps: tuple[torch.Tensor, torch.Tensor],
                teacher_maps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        losses = []
        for regressor, student, teacher in zip(self.regressors, student_maps, teacher_maps):
            predicted = regressor(student).flatten(1)
            target = teacher.detach().to(predicted.dtype).flatten(1)
            losses.append((1.0 - F.cosine_similarity(predicted, target, dim=1)).mean())
        return torch.stack(losses).mean()


def hint_loss_for(backbone: nn.Module) -> HintLoss:
    """The hint term with regressors from `backbone`'s stage maps; only the sealed student has those two stages."""
    if not isinstance(backbone, SealedCnn):
        raise ValueError("hint distillation trains the sealed student (model.kind: sealed-cnn)")
    return HintLoss(backbone.stage_channels)


def split_hints(teacher: torch.Tensor | dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, torch.Tensor] | None,
                                                                         torch.Tensor]:
    """(the teacher's two maps or None, its embedding) of a batch's teacher item (training_jobs/cached_views.py)."""
    if isinstance(teacher, dict):
        return (teacher[HINT_NAMES[0]], teacher[HINT_NAMES[1]]), teacher["embedding"]
    return None, teacher


def student_outputs(student: nn.Module, features: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor] | None,
                    loss: HintLoss | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw embedding, hint term) of a batch: the term is 0 unless the batch carries the teacher's maps and the run
    weighs them; then the student (a SealedCnn behind its identity adapter) also yields its stage maps."""
    backbone, adapter = student.get_submodule("backbone"), student.get_submodule("adapter")
    if maps is None or loss is None:  # train.student_embedding's computation (train imports this module)
        embedding: torch.Tensor = backbone(adapter(features))
        return embedding, features.new_zeros(())
    assert isinstance(backbone, SealedCnn), "hint_loss_for refused this student"
    first, second, embedding = backbone.stages(adapter(features))
    device = features.device
    return embedding, loss((first, second), (maps[0].to(device), maps[1].to(device)))
