"""The match circuit, evaluated on secret shares inside an initialised CrypTen worker.

Everything stays in CrypTen's ring Z_2^64 at *integer* scale (CrypTen precision 0), so no probabilistic
truncation is ever needed and the only approximation is the 16-bit fixed-point encoding of the inputs:

* ``q`` (query) and ``G`` (gallery rows) arrive as shares of x*2^16 (CrypTen's encoder, 16 fractional bits).
* scores = G @ q by one Beaver matmul (triple from the dealer) -> shares of <g, q>*2^32, exact, |.| <~ 2^33.
* threshold T = ceil(threshold * 2^32) (public); ``score >= threshold`` <=> ``raw >= T``.
* verify:   bits_i = [raw_i >= T] (one batched comparison), any = [sum_i bits_i >= 1] -> output any.
* identify: a tournament over the rows (log2 n rounds: one batched comparison + one batched Beaver multiply
  per round) keeps the best raw score and, obliviously, its label; ties go to the lower row index. Then
  bit = [best >= T] and output = bit * label (one Beaver multiply) -> label or 0.

Nothing is opened except Beaver-masked differences (uniform) inside the sub-protocols; the output stays an
additive share. Fixed-point ties: each coordinate is rounded to 2^-16, so a score within about
sqrt(d) * 2^-16 (~2e-4 for d = 128) of the threshold may be decided differently than float64 plaintext.
"""
from __future__ import annotations

import math

import numpy as np

RAW_SCALE = 1 << 32  # scale of a product of two 16-bit fixed-point numbers


def threshold_raw(threshold: float) -> int:
    """Smallest integer raw score (scale 2^32) that counts as ``>= threshold``."""
    return int(math.ceil(float(threshold) * RAW_SCALE))


def match_share(kind: str, query_share: np.ndarray, gallery_share: np.ndarray, labels: np.ndarray,
                threshold: float, device: str = "cpu", score_fn=None, compare_fn=None):
    """This party's int64 share of the match output (see module docstring). Requires n >= 1.

    ``score_fn(q, g, labels) -> int64 tensor [n]`` (CPU tensors in, this party's share of the raw scores out)
    replaces the Beaver matmul, e.g. the fixed-gallery protocol (``fixed_gallery.party_scores``).
    ``compare_fn(scores [n, Q] uint64 shares, t_raw) -> uint64 [Q] output shares`` replaces CrypTen's
    comparisons and knockout, e.g. the dealer-bits protocol (``compare.match``).
    """
    import torch

    from .crypten_compat import load_crypten

    crypten = load_crypten()
    MPCTensor = crypten.mpc.MPCTensor
    rank = crypten.communicator.get().get_rank()

    q = torch.from_numpy(np.ascontiguousarray(query_share, dtype=np.int64).copy())
    g = np.ascontiguousarray(gallery_share, dtype=np.int64)
    g = torch.from_numpy(g if score_fn is not None else g.copy())  # the fixed-gallery path only reads it
    n = int(g.shape[0])
    if n < 1:
        raise ValueError("match_share needs at least one gallery row")
    t_raw = threshold_raw(threshold)
    if score_fn is not None:
        lab_cpu = torch.as_tensor(np.asarray(labels, dtype=np.int64).copy())
        s = score_fn(q, g, lab_cpu)
        if compare_fn is not None:  # both steps are the project's: the share stays a CPU array between them
            return _compare_output(kind, q, compare_fn(s.numpy().view(np.uint64).reshape(n, -1), t_raw))
        scores = MPCTensor.from_shares(s.to(device) if device != "cpu" else s, precision=0)
        g = s  # only its device is used below
    else:
        if device != "cpu":
            q, g = q.to(device), g.to(device)
        qe = MPCTensor.from_shares(q, precision=0)
        ge = MPCTensor.from_shares(g, precision=0)
        scores = ge.matmul(qe.t() if q.dim() == 2 else qe)  # [n] (or [n, Q]) shares of <g, q> * 2^32
    if compare_fn is not None:
        mat = scores.share.data.cpu().numpy().view(np.uint64)  # plain tensor, or the one inside a CUDALongTensor
        return _compare_output(kind, q, compare_fn(mat.reshape(n, -1), t_raw))

    if kind == "verify":
        bits = scores.ge(t_raw)  # 0/1 at scale 1
        out = bits if n == 1 else bits.sum(0, keepdim=True).ge(1)
    elif kind == "identify":
        lab = torch.as_tensor(np.asarray(labels, dtype=np.int64).copy())
        lab = lab.to(g.device)
        if q.dim() == 2:  # a batch: one column per query, the tournament runs along the rows for all at once
            lab = lab.unsqueeze(1).expand(-1, int(q.shape[0])).contiguous()
        lab_share = lab if rank == 0 else torch.zeros_like(lab)
        labs = MPCTensor.from_shares(lab_share, precision=0)
        best, best_label = _tournament(crypten, scores, labs)
        out = best.ge(t_raw) * best_label
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    share = out.share.data  # torch.Tensor (CPU) or the tensor inside a CUDALongTensor
    if q.dim() == 2:
        return [int(v) for v in share.reshape(-1).tolist()]
    return int(share.reshape(-1)[0].item())


def _compare_output(kind: str, q, out: np.ndarray):  # type: ignore[no-untyped-def]
    """compare_fn's uint64 output shares as the int (one query) or list of ints that match_share returns."""
    out_np = out.view(np.int64)
    if q.dim() == 2 or kind == "identify-best":  # identify-best: [scores..., labels...], see compare.match
        return [int(v) for v in out_np.tolist()]
    return int(out_np[0])


def _tournament(crypten, vals, labs):  # type: ignore[no-untyped-def]
    """Oblivious (max, label of the first max) by pairwise knockout; order preserved => lowest index wins ties."""
    m = int(vals.size(0))
    while m > 1:
        h = m // 2
        av, bv = vals[0:2 * h:2], vals[1:2 * h:2]
        al, bl = labs[0:2 * h:2], labs[1:2 * h:2]
        c = av.ge(bv)  # 1 where the lower-index element wins
        diff = crypten.stack([av - bv, al - bl])
        sel = diff * crypten.stack([c, c])
        nv, nl = bv + sel[0], bl + sel[1]
        if m % 2:
            nv = crypten.cat([nv, vals[m - 1:m]])
            nl = crypten.cat([nl, labs[m - 1:m]])
        vals, labs, m = nv, nl, h + (m % 2)
    return vals, labs
