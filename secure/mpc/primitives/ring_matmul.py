"""Exact products modulo 2^38 through float64 BLAS: the matrix as centred floats, the right side as signed digits.

Why: torch's int64 matmul has no BLAS kernel (~0.5 GMAC/s here), while a float64 GEMM runs ~40x faster. The
comparison protocol needs scores only modulo 2^N_BITS (38 bits, ``correlations.py``), so the score step computes
M . v mod 2^38 as  sum_j (M' . v_j) 2^(w j)  where
* M' is M mod 2^38 centred into [-2^37, 2^37) and kept as float64 (8 bytes per entry, like the int64 rows);
* v_j are the signed base-2^w digits of v, each in [-2^(w-1), 2^(w-1));
* each GEMM sums at most k = 256 terms, and  2^37 * 2^(w-1) * k <= 2^53  keeps every partial sum exact in
  float64: w = 9 (5 digits) for k = 256, w = 10 (4 digits) for k <= 128 (the dealer's d = 128 side).
(An earlier version used 8-bit limbs on both sides in float32: 15 limb pairs instead of 4-5 digits, and
uint8 -> float32 conversions per call; about 2x slower here.)
"""
from __future__ import annotations

import math

import torch

MOD_BITS = 38
K_BLOCK = 256          # terms per GEMM (larger K is cut into blocks whose int64 results are summed)
ROW_CHUNK = 2048       # rows per GEMM on the CPU (bounds the temporary [rows, digits * Q] product)
GPU_ROW_CHUNK = 1 << 17  # rows per GEMM on a GPU (big kernels; ~100 MB of temporaries at Q = 16)
MIN_BATCH = 4          # below this many columns torch's int64 matrix-vector product is faster

_MOD_MASK = (1 << MOD_BITS) - 1
_HALF = 1 << (MOD_BITS - 1)


def to_float_rows(m: torch.Tensor) -> torch.Tensor:
    """int64 [rows, cols] -> float64 [rows, cols]: each entry mod 2^MOD_BITS, centred (exact: < 2^53)."""
    return (((m + _HALF) & _MOD_MASK) - _HALF).to(torch.float64)


def digit_bits(k_block: int) -> int:
    """The widest signed digit whose products with centred entries sum exactly over ``k_block`` terms."""
    return 53 - (MOD_BITS - 1) + 1 - max(0, math.ceil(math.log2(max(1, k_block))))


def signed_digits(v: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 [K, Q] -> float64 [K, D * Q], D = ceil(MOD_BITS / bits): column block j holds digit j of v
    (v = sum_j d_j 2^(bits j) modulo 2^(D bits)), each digit in [-2^(bits-1), 2^(bits-1))."""
    base, half = 1 << bits, 1 << (bits - 1)
    carry = torch.zeros_like(v)
    out = []
    for j in range(-(-MOD_BITS // bits)):
        digit = ((v >> (bits * j)) & (base - 1)) + carry
        carry = (digit >= half).to(torch.int64)
        out.append(digit - carry * base)
    return torch.cat(out, dim=1).to(torch.float64)


def float_matmul(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(M . v) mod 2^MOD_BITS as int64 in [0, 2^MOD_BITS), from ``rows`` = ``to_float_rows(M)`` [n, K] and int64
    v [K] or [K, Q]. Exact. Runs on ``rows``' device (CPU or CUDA: float64 GEMMs are exact there too, TF32
    only ever applies to float32); the result is on that device."""
    vec = v.dim() == 1
    v2 = v.reshape(-1, 1) if vec else v
    k, q = int(v2.shape[0]), int(v2.shape[1])
    n = int(rows.shape[0])
    k_block = min(k, K_BLOCK)
    bits = digit_bits(k_block)
    digits = signed_digits(v2.cpu(), bits).to(rows.device)
    n_digits = digits.shape[1] // q
    out = torch.zeros(n, q, dtype=torch.int64, device=rows.device)
    chunk = ROW_CHUNK if rows.device.type == "cpu" else GPU_ROW_CHUNK
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        acc = out[start:stop]
        for kb in range(0, k, k_block):
            prod = (rows[start:stop, kb:kb + k_block] @ digits[kb:kb + k_block]).to(torch.int64)
            for j in range(n_digits):
                acc += prod[:, j * q:(j + 1) * q] << (bits * j)
    out &= _MOD_MASK
    return out.reshape(-1) if vec else out
