"""Privacy presets: the names a tenant chooses between, each a frequency transform with its own trained model.

Why names and not transforms: an integrator picks how much of the face leaves the device ("balanced" or
"strict"), not a coefficient list. Each preset maps to one transform preset of `inference.transform.PRESETS`;
the gateway serves one active model version per preset side by side, and `GET /v1/transforms` tells a
tenant's SDK which transform its preset uses. The figures behind each choice (held-out accuracy, learned
attackers' rank-1) are in `docs/models/presets.md`.
"""

from __future__ import annotations

# privacy preset -> transform preset (inference.transform.PRESETS)
PRIVACY_PRESETS: dict[str, str] = {
    "accurate": "dct8-v0",  # luma DC removed only: best accuracy, and a learned inverter rebuilds the face
    # the 12 lowest frequencies removed from every channel: the most kept while a learned inverter's rebuilds stay
    # <= 30% recognisable (dct8-low10 until 2026-12-06 morning, dct8-low8 until 2026-12-06 night)
    "balanced": "dct8-low12",
    "strict": "dct8-low21",  # the 21 lowest removed: the least appearance left in the features
}


def preset_of_transform(transform_name: str) -> str:
    """The privacy preset a transform serves; a transform outside every preset names itself (such a model can
    be registered and activated, and only tenants that name that transform reach it)."""
    for preset, name in PRIVACY_PRESETS.items():
        if name == transform_name:
            return preset
    return transform_name


def check_preset(preset: str) -> str:
    if preset not in PRIVACY_PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRIVACY_PRESETS)}, not {preset!r}")
    return preset
