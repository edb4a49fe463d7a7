"""model.json: what a model version expects (its transform), what it is (checksum) and how good it is.

Written by inference.export next to model.onnx; read by the gateway's registry. load() refuses a
directory whose ONNX file does not match the recorded sha256, so a half-written or swapped file is
never served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.transform import TransformSpec

METADATA_FILE = "model.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelMetadata:
    version: str
    transform: dict[str, Any]
    transform_id: str
    params_hash: str
    embedding_dim: int
    sha256: str
    onnx_file: str
    ort_vs_torch_max_abs_diff: float
    threshold: float  # cosine threshold served for verification (see metrics["protocol"])
    metrics: dict[str, Any] = field(default_factory=dict)
    impostor_curve: dict[str, Any] = field(default_factory=dict)  # inference.operating_points.ImpostorCurve
    # The PyTorch parameters beside the ONNX file ({"file", "sha256", "architecture"}), so that training (e.g. a
    # federated job) can start from this version; empty for a version shipped as ONNX only.
    weights: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> TransformSpec:
        return TransformSpec.from_dict(self.transform)

    def save(self, version_dir: Path) -> Path:
        path = Path(version_dir) / METADATA_FILE
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, version_dir: Path, verify: bool = True) -> "ModelMetadata":
        """Read model.json; with verify, check the ONNX checksum and that the transform fields agree."""
        data = json.loads((Path(version_dir) / METADATA_FILE).read_text())
        meta = cls(**data)
        if verify:
            meta.verify(Path(version_dir))
        return meta

    def verify(self, version_dir: Path) -> None:
        actual = file_sha256(Path(version_dir) / self.onnx_file)
        if actual != self.sha256:
            raise ValueError(f"{self.onnx_file} sha256 {actual} does not match model.json ({self.sha256})")
        spec = self.spec
        if (spec.transform_id, spec.params_hash) != (self.transform_id, self.params_hash):
            raise ValueError("model.json transform_id/params_hash do not match its transform parameters")
