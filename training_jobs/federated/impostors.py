"""GAN impostor features: negatives for a device that holds one identity (pure torch, no Flower).

A device knows only its owner's face, so its margin loss has no negatives. A small generator of the SDK's
frequency features (the clipped DCT planes of `inference.transform`, [K, 14, 14]) is trained CENTRALLY, as a
DCGAN-style pair against a discriminator, on LFW training identities (never folds 6-10, nor the identities the
simulations use as clients), and shipped to devices. On a device, generated features get the SAME served noise
as real ones (`add_noise`) and go through the received model: their embeddings are the impostors the device
pushes away from (supervised: from its class vector; unsupervised: from its views).

Scale: the generator works in units of the transform's clip bound B_c (tanh output in [-1, 1]), so every
generated coefficient lies in [-B_c, B_c], as every real clipped coefficient does.
The checkpoint stores the transform's params_hash (without the noise level): a generator for another transform is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.transform import GRID, TransformSpec, add_noise

NEGATIVES = ("none", "gan")
DEFAULT_CHECKPOINT = Path(__file__).parent / "impostor_gan_dct8-v0.pt"


class FeatureGenerator(nn.Module):
    """z [n, z_dim] -> clipped DCT features in units of the clip bound, [n, K, 14, 14] in [-1, 1]."""

    def __init__(self, channels: int, z_dim: int = 32, width: int = 48) -> None:
        super().__init__()
        self.channels, self.z_dim, self.width = channels, z_dim, width
        half = GRID // 2
        self.project = nn.Sequential(nn.Linear(z_dim, width * half * half), nn.BatchNorm1d(width * half * half),
                                     nn.ReLU())
        self.body = nn.Sequential(
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),  # 7 -> 14
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), self.width, GRID // 2, GRID // 2)
        return torch.tanh(self.body(x))


class FeatureDiscriminator(nn.Module):
    """Real or generated? On features in units of the clip bound."""

    def __init__(self, channels: int, width: int = 48) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # 14 -> 7
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),  # 7 -> 4
            nn.Flatten(), nn.Linear(2 * width * 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.body(x).squeeze(1)
        return result


def clean_hash(spec: TransformSpec) -> str:
    """The transform's hash without its noise: the generator makes clipped features before noise, so one
    checkpoint serves every noise level of the same transform."""
    return dataclasses.replace(spec, epsilon_per_coefficient=None, delta=None).params_hash


def to_units(features: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Clipped features [n, K, 14, 14] -> units of the clip bound (what the GAN sees), float32."""
    result: np.ndarray = (features / spec.clip_bounds()[:, None, None]).astype(np.float32)
    return result


def train_gan(real_units: np.ndarray, steps: int, batch_size: int = 64, lr: float = 2e-4, seed: int = 0,
              z_dim: int = 32, log_every: int = 50, max_seconds: float | None = None,
              ) -> tuple[FeatureGenerator, list[dict[str, Any]]]:
    """Non-saturating GAN loss with Adam(0.5, 0.999) (DCGAN's recipe) for `steps` generator steps, or fewer
    when `max_seconds` run out first (a CPU budget on a shared machine)."""
    deadline = time.monotonic() + max_seconds if max_seconds is not None else None
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    channels = real_units.shape[1]
    generator, discriminator = FeatureGenerator(channels, z_dim), FeatureDiscriminator(channels)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    real_all = torch.from_numpy(real_units)
    history = []
    for step in range(1, steps + 1):
        real = real_all[rng.integers(0, len(real_all), batch_size)]
        fake = generator(torch.randn(batch_size, z_dim))
        d_loss = (F.softplus(-discriminator(real)).mean() + F.softplus(discriminator(fake.detach())).mean())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = F.softplus(-discriminator(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        out_of_time = deadline is not None and time.monotonic() > deadline
        if step % log_every == 0 or step == steps or out_of_time:
            history.append({"step": step, "d_loss": round(d_loss.item(), 4), "g_loss": round(g_loss.item(), 4)})
        if out_of_time:
            break
    return generator.eval(), history


def save_generator(generator: FeatureGenerator, spec: TransformSpec, path: Path, trained_on: dict[str, Any]) -> str:
    """Write the checkpoint (weights, architecture, transform hash, provenance); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": generator.state_dict(), "channels": generator.channels, "z_dim": generator.z_dim,
                "width": generator.width, "transform_hash": clean_hash(spec), "transform_id": spec.transform_id,
                "trained_on": trained_on}, path)
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_generator(path: Path, spec: TransformSpec, sha256: str | None = None) -> FeatureGenerator:
    """The generator of a checkpoint, refused (ValueError) if it was made for another transform or its bytes
    differ from the `sha256` the server announced."""
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"impostor generator {path} does not match the announced sha256")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data["transform_hash"] != clean_hash(spec):
        raise ValueError(f"impostor generator {path} was trained for transform {data['transform_id']} "
                         f"({data['transform_hash']}), not {spec.transform_id} ({clean_hash(spec)})")
    generator = FeatureGenerator(int(data["channels"]), int(data["z_dim"]), int(data["width"]))
    generator.load_state_dict(data["state_dict"])
    return generator.eval().requires_grad_(False)


@dataclass
class ImpostorSource:
    """Generated impostor features with the served noise, as a device feeds them to its model."""

    generator: FeatureGenerator
    spec: TransformSpec

    @torch.no_grad()
    def clean(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Generated clipped features (before noise), float64 [count, K, 14, 14], |x_c| <= B_c."""
        torch_rng = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        z = torch.randn(count, self.generator.z_dim, generator=torch_rng)
        units = self.generator(z).double().numpy()
        result: np.ndarray = units * self.spec.clip_bounds()[:, None, None]
        return result

    def sample(self, count: int, rng: np.random.Generator) -> torch.Tensor:
        """Generated features plus the served noise, float32 [count, K, 14, 14] (what the model sees)."""
        return torch.from_numpy(add_noise(self.clean(count, rng), self.spec, rng).astype(np.float32))


def negative_margin_loss(embeddings: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """mean(relu(cos(e, g) - margin)^2) over all (anchor, impostor) pairs: push anchors and impostors apart."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(negatives, dim=-1).T
    return F.relu(cos - margin).pow(2).mean()


@lru_cache(maxsize=2)
def _cached_generator(path: str, spec_json: str, sha256: str | None) -> FeatureGenerator:
    return load_generator(Path(path), TransformSpec.from_dict(json.loads(spec_json)), sha256)


def source_from_config(config: Mapping[str, Any], spec: TransformSpec) -> ImpostorSource | None:
    """The round's impostor source: None for `negatives` none (or absent); for gan, the generator the round
    names (`impostor-path`, checked against `impostor-sha256`), loaded once per process."""
    negatives = str(config.get("negatives", "none"))
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, not {negatives!r}")
    if negatives == "none":
        return None
    sha = config.get("impostor-sha256")
    generator = _cached_generator(str(config["impostor-path"]), json.dumps(spec.to_dict(), sort_keys=True),
                                  str(sha) if sha else None)
    return ImpostorSource(generator, spec)
