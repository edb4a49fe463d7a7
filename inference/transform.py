"""The frequency transform: the ONE implementation shared by the client SDK, training and the server.

An aligned 112x112 RGB face becomes a stack of noisy 8x8-block DCT coefficient planes:

1. RGB -> YCbCr (JPEG full range, float64), level-shifted by -128 as JPEG does before its DCT, so that
   every channel, DC included, is centred near zero and a symmetric clip bound makes sense.
2. 8x8 block DCT (orthonormal DCT-II) per colour channel -> 64 frequency planes of 14x14 per channel.
   Frequency index k = 8*u + v (raster order inside the block; u = vertical, v = horizontal frequency;
   0 = DC).
3. Channel selection. Feature channel order is fixed: all kept luma indices (ascending), then the kept
   chroma indices for Cb (ascending), then the same indices for Cr ("sparse colour").
4. Clip each kept channel c to +-B_c, B_c = clip_sigmas * channel_std[c] (per-channel std measured on
   LFW identities outside every evaluation fold, see `training_jobs.compute_stats`).
5. Noise per coefficient (the mechanism protects each coefficient; "neighbouring" = the coefficient is
   replaced by any other value in [-B_c, B_c], so the sensitivity is 2*B_c):
   - Laplace: scale b_c = 2*B_c / eps_coef, pure eps_coef-DP per coefficient.
   - Gaussian: sigma_c = 2*B_c * sqrt(2 ln(1.25/delta)) / eps_coef, (eps_coef, delta)-DP per coefficient
     (the classic bound, strictly valid for eps_coef < 1).
   Per image, basic composition over the K*196 released coefficients: eps_image = K*196*eps_coef
   (and delta_image = K*196*delta for Gaussian). That is an honest but loose upper bound.
   An ALLOCATED spec (epsilon_weights) spends the same per-image budget unevenly: channel c gets
   eps_coef * w_c with mean(w) = 1, so eps_image is unchanged (`training_jobs.noise_allocation` learns w
   against an inverter: more noise where the inverter gains most, less where recognition needs it).
   A RANDOM-SUBSET spec (random_channels = N, PartialFace-style; never also allocated) releases N of the K
   channels per image, a uniform subset independent of the face (pinned per device by the SDK's
   `PinnedSubsetNoise`, fresh per image in training), the rest as zeros: eps_image = N*196*eps_coef.
   epsilon_per_coefficient=None disables noise: the features are then NOT differentially private and
   epsilon_per_image is reported as infinity.
6. Cast to float16 (values beyond float16 range are clamped first; clamping is post-processing and
   costs no privacy).

Caveat: noise is drawn with numpy's floating-point samplers, which are known to leak through their
low-order bits (Mironov 2012); the stated ε ignores that effect.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

# re-exported: the SDK, training and the server import the block DCT from here
from inference.dct import BLOCK as BLOCK, COEFFS as COEFFS, FACE_SIZE as FACE_SIZE, GRID as GRID, POSITIONS as POSITIONS
from inference.dct import LEVEL_SHIFT as LEVEL_SHIFT, YCBCR_OFFSET as YCBCR_OFFSET, YCBCR_TO_RGB as YCBCR_TO_RGB
from inference.dct import ZIGZAG as ZIGZAG, block_dct as block_dct, block_idct as block_idct, dct_matrix as dct_matrix
from inference.dct import check_face, rgb_to_ycbcr as rgb_to_ycbcr, ycbcr_to_rgb as ycbcr_to_rgb
# re-exported: the SDK draws its privacy noise from OsNoise, a random-subset spec's channels from PinnedSubsetNoise
from inference.noise import NoiseSource as NoiseSource, OsNoise as OsNoise, PinnedSubsetNoise as PinnedSubsetNoise
from inference.noise import SUBSET_KEY_BYTES as SUBSET_KEY_BYTES

FLOAT16_MAX = 65504.0
MECHANISMS = ("laplace", "gaussian")
STATS_PATH = Path(__file__).parent / "transforms" / "dct8_stats.json"
ALLOCATIONS = Path(__file__).parent / "transforms" / "allocations"  # learned per-channel ε weights


@dataclass(frozen=True)
class TransformSpec:
    """Every parameter of one versioned transform; the server serves features made with exactly these.

    channel_std holds one std per KEPT channel, in feature order, so that the spec alone (no stats file)
    defines the transform and its hash.
    """

    name: str
    luma_keep: tuple[int, ...]
    chroma_keep: tuple[int, ...]
    clip_sigmas: float
    mechanism: str
    epsilon_per_coefficient: float | None
    delta: float | None
    channel_std: tuple[float, ...]
    epsilon_weights: tuple[float, ...] | None = None  # per kept channel, mean 1: the same total budget
    random_channels: int | None = None  # channels released per image: a uniform subset (per device in the SDK)

    def __post_init__(self) -> None:
        _check_indices("luma_keep", self.luma_keep)
        _check_indices("chroma_keep", self.chroma_keep)
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, not {self.mechanism!r}")
        if not self.clip_sigmas > 0:
            raise ValueError("clip_sigmas must be positive")
        if len(self.channel_std) != self.num_channels or not all(s > 0 for s in self.channel_std):
            raise ValueError(f"channel_std needs {self.num_channels} positive values, got {len(self.channel_std)}")
        eps = self.epsilon_per_coefficient
        if eps is not None and not (eps > 0 and math.isfinite(eps)):
            raise ValueError("epsilon_per_coefficient must be a positive finite number or None (no noise)")
        if self.mechanism == "gaussian" and eps is not None and not (self.delta and 0 < self.delta < 1):
            raise ValueError("the Gaussian mechanism needs 0 < delta < 1")
        if self.mechanism == "laplace" and self.delta not in (None, 0.0):
            raise ValueError("the Laplace mechanism takes no delta")
        _check_weights(self.epsilon_weights, self.num_channels)
        if self.random_channels is not None and not 0 < self.random_channels < self.num_channels:
            raise ValueError(f"random_channels must be in 1..{self.num_channels - 1} (or None: every channel)")
        if self.random_channels is not None and self.epsilon_weights is not None:
            raise ValueError("a spec is either allocated or random-subset (with both, its ε depends on the subset)")

    @property
    def num_channels(self) -> int:
        return len(self.luma_keep) + 2 * len(self.chroma_keep)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_channels, GRID, GRID)

    @property
    def released_channels(self) -> int:
        """Channels that carry values in one image (the rest are zeros)."""
        return self.num_channels if self.random_channels is None else self.random_channels

    @property
    def noisy(self) -> bool:
        return self.epsilon_per_coefficient is not None

    @property
    def epsilon_per_image(self) -> float:
        """Basic composition over the released coefficients (N*196 of a random-subset spec, else K*196); inf
        when there is no noise."""
        if self.epsilon_per_coefficient is None:
            return math.inf
        return self.released_channels * POSITIONS * self.epsilon_per_coefficient

    @property
    def delta_per_image(self) -> float:
        """Composed delta (0 for Laplace; 1 = no guarantee when there is no noise)."""
        if self.epsilon_per_coefficient is None:
            return 1.0
        return self.released_channels * POSITIONS * (self.delta or 0.0)

    @property
    def transform_id(self) -> str:
        """Human-readable id, e.g. "dct8-y63c5-lap32" ("-r33": 33 channels per image); params_hash tells specs
        with equal ids apart."""
        subset = "" if self.random_channels is None else f"-r{self.random_channels}"
        return f"dct8-y{len(self.luma_keep)}c{len(self.chroma_keep)}-{_noise_tag(self)}{subset}"

    @property
    def params_hash(self) -> str:
        """First 16 hex digits of sha256 over the canonical JSON of every parameter (stats included)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def clip_bounds(self) -> np.ndarray:
        """B_c per kept channel, float64 [K]."""
        return self.clip_sigmas * np.asarray(self.channel_std, dtype=np.float64)

    def noise_scales(self) -> np.ndarray:
        """Laplace b_c or Gaussian sigma_c per kept channel (zeros without noise), float64 [K]."""
        if self.epsilon_per_coefficient is None:
            return np.zeros(self.num_channels)
        sensitivity = 2.0 * self.clip_bounds()
        scale = sensitivity / (self.epsilon_per_coefficient * self.weights())
        if self.mechanism == "gaussian":
            assert self.delta is not None  # __post_init__ refuses the Gaussian mechanism without a delta
            scale = scale * math.sqrt(2.0 * math.log(1.25 / self.delta))
        return scale

    def weights(self) -> np.ndarray:
        """Each kept channel's share of the per-coefficient ε (all ones unless the spec is allocated)."""
        return np.ones(self.num_channels) if self.epsilon_weights is None else np.asarray(self.epsilon_weights)

    def to_dict(self) -> dict[str, Any]:
        """Canonical parameters; fields added later (epsilon_weights, random_channels) are left out when unused,
        so the hashes of older specs hold."""
        data = asdict(self)
        for key in ("luma_keep", "chroma_keep", "channel_std"):
            data[key] = list(data[key])
        for key in ("epsilon_weights", "random_channels"):
            if data[key] is None:
                del data[key]
        if self.epsilon_weights is not None:
            data["epsilon_weights"] = list(self.epsilon_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformSpec":
        return cls(
            name=str(data["name"]),
            luma_keep=tuple(int(i) for i in data["luma_keep"]),
            chroma_keep=tuple(int(i) for i in data["chroma_keep"]),
            clip_sigmas=float(data["clip_sigmas"]),
            mechanism=str(data["mechanism"]),
            epsilon_per_coefficient=_optional_float(data.get("epsilon_per_coefficient")),
            delta=_optional_float(data.get("delta")),
            channel_std=tuple(float(s) for s in data["channel_std"]),
            epsilon_weights=None if data.get("epsilon_weights") is None
            else tuple(float(w) for w in data["epsilon_weights"]),
            random_channels=None if data.get("random_channels") is None else int(data["random_channels"]),
        )

    def with_epsilon(self, epsilon_per_coefficient: float | None, delta: float | None = None) -> "TransformSpec":
        """The same transform with another noise level (None: no noise)."""
        return replace(self, epsilon_per_coefficient=epsilon_per_coefficient,
                       delta=delta if delta is not None else self.delta)

    def apply(self, face_rgb: np.ndarray, rng: NoiseSource) -> np.ndarray:
        return apply(face_rgb, self, rng)

    def clean(self, face_rgb: np.ndarray) -> np.ndarray:
        return clean(face_rgb, self)


def _check_indices(field: str, indices: tuple[int, ...]) -> None:
    if list(indices) != sorted(set(indices)) or any(not 0 <= i < COEFFS for i in indices):
        raise ValueError(f"{field} must be strictly ascending frequency indices in 0..63")


def _check_weights(weights: tuple[float, ...] | None, channels: int) -> None:
    """An allocation must cover every kept channel, be positive and keep the total budget (mean 1)."""
    if weights is None:
        return
    if len(weights) != channels or not all(w > 0 and math.isfinite(w) for w in weights):
        raise ValueError(f"epsilon_weights needs {channels} positive finite values, got {len(weights)}")
    if abs(sum(weights) / channels - 1.0) > 1e-6:
        raise ValueError(f"epsilon_weights must average 1 (the same total budget), not {sum(weights) / channels:.6f}")


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _noise_tag(spec: TransformSpec) -> str:
    if spec.epsilon_per_coefficient is None:
        return "clean"
    allocated = "a" if spec.epsilon_weights is not None else ""
    if spec.mechanism == "laplace":
        return f"lap{spec.epsilon_per_coefficient:g}{allocated}"
    return f"gau{spec.epsilon_per_coefficient:g}d{spec.delta:g}{allocated}"


def full_coefficients(face_rgb: np.ndarray) -> np.ndarray:
    """All frequency planes, float64 [..., 3, 64, 14, 14] (Y, Cb, Cr); used for stats and studies."""
    check_face(face_rgb)
    return block_dct(rgb_to_ycbcr(face_rgb))


def kept_index(spec: TransformSpec) -> tuple[np.ndarray, np.ndarray]:
    """(colour channel, frequency) of each feature channel, in feature order."""
    colours = [0] * len(spec.luma_keep) + [1] * len(spec.chroma_keep) + [2] * len(spec.chroma_keep)
    freqs = list(spec.luma_keep) + list(spec.chroma_keep) * 2
    return np.array(colours), np.array(freqs)


def select(coefficients: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """[..., 3, 64, 14, 14] -> [..., K, 14, 14] kept channels in feature order."""
    colours, freqs = kept_index(spec)
    return coefficients[..., colours, freqs, :, :]


def clipped(face_rgb: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Kept, clipped channels before noise, float64 [..., K, 14, 14]."""
    features = select(full_coefficients(face_rgb), spec)
    bounds = spec.clip_bounds()[:, None, None]
    kept: np.ndarray = np.clip(features, -bounds, bounds)
    return kept


def add_noise(features: np.ndarray, spec: TransformSpec, rng: NoiseSource) -> np.ndarray:
    """Clipped features [..., K, 14, 14] plus the spec's calibrated noise (float64); unchanged without noise."""
    if not spec.noisy:
        return features
    scales = np.broadcast_to(spec.noise_scales()[:, None, None], features.shape)
    noise = rng.laplace(0.0, scales) if spec.mechanism == "laplace" else rng.normal(0.0, scales)
    noisy: np.ndarray = features + noise
    return noisy


def release(features: np.ndarray, spec: TransformSpec, rng: NoiseSource) -> np.ndarray:
    """Keep `random_channels` channels of each image [..., K, 14, 14], a uniform random subset drawn apart from
    the face, and zero the rest (a model serving the spec sees which ones it got); unchanged for other specs."""
    if spec.random_channels is None:
        return features
    order = rng.random((*features.shape[:-3], spec.num_channels)).argsort(axis=-1)  # a random permutation
    released: np.ndarray = np.where((order < spec.random_channels)[..., None, None], features, 0.0)
    return released


def to_float16(features: np.ndarray) -> np.ndarray:
    """Clamp into float16's finite range (post-processing) and cast."""
    clamped: np.ndarray = np.clip(features, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
    return clamped


def apply(face_rgb: np.ndarray, spec: TransformSpec, rng: NoiseSource) -> np.ndarray:
    """The client-side transform: aligned RGB uint8 face(s) [..., 112, 112, 3] -> float16 [..., K, 14, 14]."""
    return to_float16(release(add_noise(clipped(face_rgb, spec), spec, rng), spec, rng))


def clean(face_rgb: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """The same features without noise, every channel (training targets, studies); float16 like apply()."""
    return to_float16(clipped(face_rgb, spec))


def inverse(features: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Naive rebuild for leakage studies: removed channels = 0, inverse DCT -> RGB uint8 [..., 112, 112, 3]
    (chroma planes with every coefficient removed rebuild as mid-grey chroma: zero after level shift)."""
    features = np.asarray(features, dtype=np.float64)
    if features.shape[-3:] != spec.shape:
        raise ValueError(f"features shape {features.shape} does not end with {spec.shape}")
    lead = features.shape[:-3]
    coefficients = np.zeros((*lead, 3, COEFFS, GRID, GRID))
    colours, freqs = kept_index(spec)
    coefficients[..., colours, freqs, :, :] = features
    rgb = ycbcr_to_rgb(block_idct(coefficients))
    pixels: np.ndarray = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return pixels


# ---------------------------------------------------------------------------------------------------
# Presets built from the committed per-channel stats.

V0_LUMA_KEEP = tuple(range(1, COEFFS))  # everything but DC
V0_CHROMA_KEEP = (1, 2, 8, 9, 16)  # five low AC frequencies: "sparse colour"
LOW10 = (0, 1, 2, 3, 8, 9, 10, 16, 17, 24)  # the 10 lowest frequencies (zig-zag), ~95% of luma AC variance
LOW10_LUMA_KEEP = tuple(k for k in range(COEFFS) if k not in LOW10)
LOW10_CHROMA_KEEP = (4, 11, 18, 25, 32)  # the next five in zig-zag order, so colour stays sparse


def _low_removed(count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(luma keep, chroma keep) with the ``count`` lowest zig-zag frequencies removed; chroma keeps the next five."""
    removed = set(ZIGZAG[:count])
    return tuple(k for k in range(COEFFS) if k not in removed), tuple(sorted(ZIGZAG[count:count + 5]))
DEFAULT_CLIP_SIGMAS = 4.0
# Chosen by the fold-1 measurement in docs/models/v0.md: the strongest noise whose accuracy with model
# v0 stays within ~2 points of no noise.
DEFAULT_EPSILON_PER_COEFFICIENT = 64.0


@lru_cache(maxsize=4)
def load_stats(path: Path = STATS_PATH) -> dict[str, Any]:
    """Per-channel DCT statistics written by `python -m training_jobs.compute_stats`."""
    stats: dict[str, Any] = json.loads(Path(path).read_text())
    return stats


def make_spec(name: str, luma_keep: tuple[int, ...], chroma_keep: tuple[int, ...],
              epsilon_per_coefficient: float | None = DEFAULT_EPSILON_PER_COEFFICIENT,
              mechanism: str = "laplace", delta: float | None = None,
              clip_sigmas: float = DEFAULT_CLIP_SIGMAS, stats: dict[str, Any] | None = None) -> TransformSpec:
    """A spec whose channel_std comes from the committed stats file."""
    std = (stats or load_stats())["std"]
    channel_std = [std["Y"][k] for k in luma_keep] + [std["Cb"][k] for k in chroma_keep] \
        + [std["Cr"][k] for k in chroma_keep]
    return TransformSpec(name, tuple(luma_keep), tuple(chroma_keep), clip_sigmas, mechanism,
                         epsilon_per_coefficient, delta, tuple(float(s) for s in channel_std))


def spec_v0(epsilon_per_coefficient: float | None = DEFAULT_EPSILON_PER_COEFFICIENT) -> TransformSpec:
    """Default v0: DC removed everywhere, luma AC 1..63, chroma (1,2,8,9,16), clip 4 sigma, Laplace."""
    return make_spec("dct8-v0", V0_LUMA_KEEP, V0_CHROMA_KEEP, epsilon_per_coefficient)


def spec_low(count: int, epsilon_per_coefficient: float | None = DEFAULT_EPSILON_PER_COEFFICIENT) -> TransformSpec:
    """The ``count`` lowest zig-zag frequencies removed, colour from the next five (the frontier candidates
    screened between dct8-v0 and dct8-low10 for the `balanced` preset, issue 10)."""
    return make_spec(f"dct8-low{count}", *_low_removed(count), epsilon_per_coefficient)


def spec_low10(epsilon_per_coefficient: float | None = DEFAULT_EPSILON_PER_COEFFICIENT) -> TransformSpec:
    """The 10 lowest frequencies removed from every channel (for the model work; v0 accuracy is poor)."""
    return make_spec("dct8-low10", LOW10_LUMA_KEEP, LOW10_CHROMA_KEEP, epsilon_per_coefficient)


# Transforms a model was trained for (each has a quality gate: training_jobs/quality_gate.py).
PRESETS: dict[str, Callable[..., TransformSpec]] = {
    "dct8-v0": spec_v0, "dct8-low10": spec_low10,
    **{f"dct8-low{count}": partial(spec_low, count) for count in (8, 12, 15, 21)}}


def spec_allocated(name: str, epsilon_per_coefficient: float | None = DEFAULT_EPSILON_PER_COEFFICIENT) -> TransformSpec:
    """A committed noise allocation (`training_jobs.noise_allocation`): its base preset's channels and total
    budget, the per-coefficient ε spread over the channels by the learned weights."""
    data = json.loads((ALLOCATIONS / f"{name}.json").read_text())
    base = PRESETS[data["base"]](epsilon_per_coefficient)
    return replace(base, name=name, epsilon_weights=tuple(float(w) for w in data["weights"]))


def spec_random_subset(base: str, count: int,
                       epsilon_per_coefficient: float | None = DEFAULT_EPSILON_PER_COEFFICIENT) -> TransformSpec:
    """``base`` releasing ``count`` of its channels per image (PartialFace-style), named "<base>-r<count>" so a model
    trained on subsets never serves whole feature sets, or back."""
    return replace(PRESETS[base](epsilon_per_coefficient), name=f"{base}-r{count}", random_channels=count)


# Screened by the attack harness only (docs/attacks/README.md): no model, no quality gate.
SCREENED: dict[str, Callable[..., TransformSpec]] = {
    **{f"dct8-low{count}": partial(spec_low, count) for count in (3, 6, 9)},
    "dct8-low8-r33": partial(spec_random_subset, "dct8-low8", 33),
    **{path.stem: partial(spec_allocated, path.stem) for path in sorted(ALLOCATIONS.glob("*.json"))}}


def default_spec() -> TransformSpec:
    return spec_v0()
