"""The baseline score step: one CrypTen Beaver matmul per job (``PRIVFACE_MPC_PROTOCOL=naive``, and every verify).

scores = G @ q on shares (triple from the dealer) -> shares of <g, q> * 2^32, exact, |.| <~ 2^33; the query and the
gallery enter CrypTen at precision 0 (they already carry 16 fractional bits), so nothing is truncated. Per-query
traffic O(n d): the cost the fixed-gallery protocol (``fixed_gallery.py``) removes.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from secure.mpc.protocols.base import Comparison, JobInputs, ScoreProtocol


class NaiveScores(ScoreProtocol):
    name = "naive"

    def __init__(self, crypten: ModuleType, device: str = "cpu") -> None:
        self.crypten, self.device = crypten, device

    def scores(self, job: JobInputs, comparison: Comparison) -> Any:
        import torch

        mpc_tensor = self.crypten.mpc.MPCTensor
        q = torch.from_numpy(np.ascontiguousarray(job.query, dtype=np.int64).copy())
        g = torch.from_numpy(np.ascontiguousarray(job.gallery, dtype=np.int64).copy())
        if self.device != "cpu":
            q, g = q.to(self.device), g.to(self.device)
        qe = mpc_tensor.from_shares(q, precision=0)
        ge = mpc_tensor.from_shares(g, precision=0)
        scores = ge.matmul(qe.t() if q.dim() == 2 else qe)  # [n] (or [n, Q]) shares of <g, q> * 2^32
        return scores.share.data  # a plain tensor, or the one inside a CUDALongTensor
