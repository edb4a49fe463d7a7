"""The 8x8 block DCT of an aligned face: colour conversion, the orthonormal DCT-II and its inverse.

Pure pixel <-> frequency maps with no privacy parameters; `inference/transform.py` builds the features (channel
selection, clipping, noise) on top of them and re-exports these names, so callers keep importing from there.
"""
from __future__ import annotations

import numpy as np

BLOCK = 8
FACE_SIZE = 112
GRID = FACE_SIZE // BLOCK  # 14 blocks per side
COEFFS = BLOCK * BLOCK  # 64 frequencies per block
POSITIONS = GRID * GRID  # 196 blocks per image

# JPEG (ITU-T T.871) full-range RGB -> YCbCr; offset added after the matrix.
RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                          [-0.168735892, -0.331264108, 0.5],
                          [0.5, -0.418687589, -0.081312411]])
YCBCR_OFFSET = np.array([0.0, 128.0, 128.0])
YCBCR_TO_RGB = np.linalg.inv(RGB_TO_YCBCR)
LEVEL_SHIFT = 128.0


def dct_matrix(n: int = BLOCK) -> np.ndarray:
    """Orthonormal DCT-II matrix D (D @ x is the DCT of x; D.T @ X inverts it)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d: np.ndarray = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    d[0, :] = np.sqrt(1.0 / n)
    return d


_D = dct_matrix()
ZIGZAG = (0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,
          7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31,
          39, 46, 53, 60, 61, 54, 47, 55, 62, 63)  # JPEG order: low frequencies first


# ---------------------------------------------------------------------------------------------------
# Pixel <-> frequency maps (all accept an optional leading batch dimension).

def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] RGB (any numeric dtype, 0..255) -> float64 [..., 3, H, W] YCbCr, level-shifted by -128."""
    ycc = rgb.astype(np.float64) @ RGB_TO_YCBCR.T + YCBCR_OFFSET - LEVEL_SHIFT
    return np.moveaxis(ycc, -1, -3)


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of rgb_to_ycbcr: float64 [..., 3, H, W] -> float64 [..., H, W, 3] (unclipped)."""
    ycc = np.moveaxis(ycc, -3, -1) + LEVEL_SHIFT - YCBCR_OFFSET
    return ycc @ YCBCR_TO_RGB.T


def block_dct(planes: np.ndarray) -> np.ndarray:
    """[..., 112, 112] -> [..., 64, 14, 14]: orthonormal 8x8 DCT-II per block, frequency k = 8u + v."""
    lead = planes.shape[:-2]
    blocks = planes.reshape(*lead, GRID, BLOCK, GRID, BLOCK).swapaxes(-3, -2)  # [..., i, j, x, y]
    coef = _D @ blocks @ _D.T  # [..., i, j, u, v]
    return np.moveaxis(coef.reshape(*lead, GRID, GRID, COEFFS), -1, -3)


def block_idct(coef: np.ndarray) -> np.ndarray:
    """Inverse of block_dct: [..., 64, 14, 14] -> [..., 112, 112]."""
    lead = coef.shape[:-3]
    coef = np.moveaxis(coef, -3, -1).reshape(*lead, GRID, GRID, BLOCK, BLOCK)  # [..., i, j, u, v]
    blocks = _D.T @ coef @ _D  # [..., i, j, x, y]
    planes: np.ndarray = blocks.swapaxes(-3, -2).reshape(*lead, FACE_SIZE, FACE_SIZE)
    return planes


def check_face(face_rgb: np.ndarray) -> None:
    """Aligned faces only: the block grid assumes 112x112 RGB."""
    if face_rgb.shape[-3:] != (FACE_SIZE, FACE_SIZE, 3):
        raise ValueError(f"expected aligned faces [..., 112, 112, 3], got {face_rgb.shape}")
