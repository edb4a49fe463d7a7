"""The frozen pixel-domain teacher a frequency-domain student is distilled from (training_jobs/train.py).

On a CPU the pretrained MobileFaceNet runs through ONNX Runtime (exported in memory when the teacher is built): its
depthwise convolutions are ~2.6x faster there than in eager PyTorch (0.27 vs 0.71 s per 64 faces on 2 threads,
same outputs within 1e-5), and the teacher's forward pass is most of a step whenever it runs online (an online
run with `loss.mixed_faces`, the cached views' build, the class-centre initialisation). On CUDA it stays in PyTorch.
With `hints=True` the teacher also returns its 14x14 and 7x7 maps (training_jobs/hints.py), as two more outputs.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from inference.mobilefacenet import load_pretrained
from training_jobs.evaluate import pixel_input
from training_jobs.hints import HINT_NAMES, TeacherWithHints


def ort_session(model: torch.nn.Module, threads: int, outputs: tuple[str, ...] = ("embeddings",)) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of `model` (input [B,3,112,112] float32), exported through a temporary file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teacher.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated but is what dynamo=False asks for
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(path), input_names=["faces"],
                              output_names=list(outputs), dynamic_axes={name: {0: "batch"} for name in ("faces", *outputs)},
                              dynamo=False)
        model_bytes = path.read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(threads, 1)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class Teacher:
    """Frozen pixel-domain embedder: clean RGB uint8 [B,112,112,3] tensor -> raw [B,128] embedding."""

    def __init__(self, kind: str, shared: Path, device: torch.device, hints: bool = False) -> None:
        self.kind = kind
        self.device = device
        self.session: ort.InferenceSession | None = None
        self.with_maps: TeacherWithHints | None = None
        if hints and kind != "mobilefacenet":
            raise ValueError("hint distillation needs teacher: mobilefacenet (its maps are the hints)")
        if kind == "mobilefacenet":
            self.model = load_pretrained(shared).to(device).eval().requires_grad_(False)
            self.with_maps = TeacherWithHints(self.model).eval() if hints else None  # eval: export restores modes
            if device.type == "cpu":
                self.session = ort_session(self.with_maps or self.model, torch.get_num_threads(),
                                           ("embeddings", *HINT_NAMES) if hints else ("embeddings",))
        elif kind == "sface":
            from training_jobs.sface import SFaceEmbedder
            self.sface = SFaceEmbedder(threads=max(torch.get_num_threads(), 1))
        elif kind != "none":
            raise ValueError(f"teacher must be mobilefacenet, sface or none, not {kind!r}")

    @torch.no_grad()
    def hints(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw embedding, 14x14 map, 7x7 map) of clean RGB uint8 faces; the teacher was built with hints=True."""
        if self.with_maps is None:
            raise ValueError("this teacher was built without hints")
        faces = pixel_input(clean.numpy())
        if self.session is not None:
            embedding, hint14, hint7 = self.session.run(None, {"faces": np.ascontiguousarray(faces.numpy())})
            return torch.from_numpy(embedding), torch.from_numpy(hint14), torch.from_numpy(hint7)
        result: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = self.with_maps(faces.to(self.device))
        return result

    @torch.no_grad()
    def __call__(self, clean: torch.Tensor) -> torch.Tensor | None:
        if self.kind == "mobilefacenet":
            faces = pixel_input(clean.numpy())
            if self.session is not None:
                out: np.ndarray = self.session.run(["embeddings"], {"faces": np.ascontiguousarray(faces.numpy())})[0]
                return torch.from_numpy(out)
            result: torch.Tensor = self.model(faces.to(self.device))
            return result
        if self.kind == "sface":
            return torch.from_numpy(self.sface.raw(clean.numpy())).to(self.device)
        return None
