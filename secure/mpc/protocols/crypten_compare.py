"""The baseline comparison: CrypTen's circuit on shares (``PRIVFACE_MPC_COMPARE=crypten``; always with TFP).

* verify:   bits_i = [raw_i >= T] (one batched comparison), any = [sum_i bits_i >= 1] -> output any.
* identify: a tournament over the rows (log2 n rounds: one batched comparison + one batched Beaver multiply per
  round) keeps the best raw score and, obliviously, its label; ties go to the lower row index. Then
  bit = [best >= T] and output = bit * label (one Beaver multiply) -> label or 0.

CrypTen's comparison is a 64-bit A2B with a Kogge-Stone adder (~38 logged rounds per level); nothing is opened but
Beaver-masked differences. Fixed-point ties: each coordinate is rounded to 2^-16, so a score within about
sqrt(d) * 2^-16 (~2e-4 for d = 128) of the threshold may be decided differently than float64 plaintext. It has no
query gate (``compare.query_ok``): it is for benchmarks.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from secure.mpc.protocols.base import Comparison, CompareProtocol, JobInputs, Output, shape_output, threshold_raw


class CrypTenComparison(Comparison):
    def __init__(self, crypten: ModuleType, rank: int, device: str, job: JobInputs) -> None:
        super().__init__()
        self.crypten, self.rank, self.device, self.job = crypten, rank, device, job

    def finish(self, scores: Any) -> Output:
        import torch

        crypten, job = self.crypten, self.job
        shares = scores.to(self.device) if self.device != "cpu" else scores
        values = crypten.mpc.MPCTensor.from_shares(shares, precision=0)
        t_raw = threshold_raw(job.threshold)
        if job.kind == "verify":
            bits = values.ge(t_raw)  # 0/1 at scale 1
            out = bits if job.compared_rows == 1 else bits.sum(0, keepdim=True).ge(1)
        else:
            lab = torch.as_tensor(np.asarray(job.labels, dtype=np.int64).copy()).to(shares.device)
            if job.query.ndim == 2:  # a batch: one column per query, the tournament runs along the rows for all
                lab = lab.unsqueeze(1).expand(-1, int(job.query.shape[0])).contiguous()
            labels = crypten.mpc.MPCTensor.from_shares(lab if self.rank == 0 else torch.zeros_like(lab), precision=0)
            best, best_label = tournament(crypten, values, labels)
            out = best.ge(t_raw) * best_label
        return shape_output(job, out.share.data.cpu().numpy())


class CrypTenCompare(CompareProtocol):
    name = "crypten"
    score_bits = 64

    def __init__(self, crypten: ModuleType, rank: int, device: str = "cpu") -> None:
        self.crypten, self.rank, self.device = crypten, rank, device

    def start(self, job: JobInputs) -> Comparison:
        return CrypTenComparison(self.crypten, self.rank, self.device, job)


def tournament(crypten: ModuleType, vals: Any, labs: Any) -> tuple[Any, Any]:
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
