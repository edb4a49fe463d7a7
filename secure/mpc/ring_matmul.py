"""Exact products in Z_2^bits (bits <= 40) through float32 BLAS: 8-bit limbs whose products sum exactly.

Why: torch's int64 matmul has no BLAS kernel (~0.5 GMAC/s here), while float32 GEMM runs ~100x faster.
The comparison protocol needs scores only modulo 2^N_BITS (38 bits, ``correlations.py``), so the score
step can compute  M . v  mod 2^40  as  sum_{i+j<5} (M_i . v_j) 2^(8(i+j))  with M_i, v_j the 8-bit limbs:
each partial sum over at most 256 terms is <= 255^2 * 256 < 2^24, exact in float32. The matrix side is
kept as uint8 limbs ([5, rows, cols], 5 bytes per entry) next to the int64 rows it was cut from.
"""
from __future__ import annotations

import torch

LIMB_BITS = 8
MOD_BITS = 40
N_LIMBS = MOD_BITS // LIMB_BITS
K_BLOCK = 256          # 255^2 * 256 < 2^24: a float32 sum over one block is exact
ROW_CHUNK = 8192


MIN_BATCH = 4          # below this many columns torch's int64 matrix-vector product is faster


def to_limbs(m: torch.Tensor) -> torch.Tensor:
    """int64 [rows, cols] -> uint8 [N_LIMBS, rows, cols]: the low MOD_BITS bits, byte i = limb i (little-endian)."""
    as_bytes = m.contiguous().view(torch.uint8).reshape(m.shape[0], m.shape[1], 8)
    return as_bytes[:, :, :N_LIMBS].permute(2, 0, 1).contiguous()


def limb_matmul(limbs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(M . v) mod 2^MOD_BITS as int64 (upper bits garbage-free: reduced), from M's limbs [L, rows, K] and
    int64 v [K] or [K, Q]. Exact."""
    vec = v.dim() == 1
    v2 = v.reshape(-1, 1) if vec else v
    k, q = int(v2.shape[0]), int(v2.shape[1])
    rows = int(limbs.shape[1])
    v_limbs = [((v2 >> (LIMB_BITS * j)) & 0xFF).to(torch.float32) for j in range(N_LIMBS)]
    rights = [torch.cat(v_limbs[:N_LIMBS - i], dim=1) for i in range(N_LIMBS)]  # limb i meets v_0..v_{L-1-i}
    out = torch.empty(rows, q, dtype=torch.int64)
    for start in range(0, rows, ROW_CHUNK):
        stop = min(rows, start + ROW_CHUNK)
        acc = torch.zeros(stop - start, q, dtype=torch.int64)
        for i in range(N_LIMBS):
            a = limbs[i, start:stop].to(torch.float32)
            for kb in range(0, k, K_BLOCK):
                prod = (a[:, kb:kb + K_BLOCK] @ rights[i][kb:kb + K_BLOCK]).to(torch.int64)
                for j in range(N_LIMBS - i):
                    acc += prod[:, j * q:(j + 1) * q] << (LIMB_BITS * (i + j))
        out[start:stop] = acc
    out &= (1 << MOD_BITS) - 1
    return out.reshape(-1) if vec else out
