"""The frozen pixel-domain teacher a frequency-domain student is distilled from (training_jobs/train.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from inference.mobilefacenet import load_pretrained
from training_jobs.evaluate import pixel_input


class Teacher:
    """Frozen pixel-domain embedder: clean RGB uint8 [B,112,112,3] tensor -> raw [B,128] embedding."""

    def __init__(self, kind: str, shared: Path, device: torch.device) -> None:
        self.kind = kind
        self.device = device
        if kind == "mobilefacenet":
            self.model = load_pretrained(shared).to(device).eval().requires_grad_(False)
        elif kind == "sface":
            from training_jobs.sface import SFaceEmbedder
            self.sface = SFaceEmbedder(threads=max(torch.get_num_threads(), 1))
        elif kind != "none":
            raise ValueError(f"teacher must be mobilefacenet, sface or none, not {kind!r}")

    @torch.no_grad()
    def __call__(self, clean: torch.Tensor) -> torch.Tensor | None:
        if self.kind == "mobilefacenet":
            result: torch.Tensor = self.model(pixel_input(clean.numpy()).to(self.device))
            return result
        if self.kind == "sface":
            return torch.from_numpy(self.sface.raw(clean.numpy())).to(self.device)
        return None
