"""The server's spread-out regulariser on the clients' class vectors (FedAwS, used by FedFace).

A client only knows its own class vector, so nothing on the device pushes identities apart. After each
round the server, which holds the class vectors of the clients seen so far, takes a few gradient steps on
    L = sum over pairs i < j of relu(cos(w_i, w_j) - margin)^2
and sends every client its updated vector in the next round it is sampled. With margin 0 the vectors are
pushed towards pairwise non-positive cosine, as different faces are in a good embedding space.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def spreadout_loss(vectors: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over distinct pairs of relu(cos - margin)^2."""
    unit = F.normalize(vectors, dim=1)
    cos = unit @ unit.T
    upper = torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)
    return F.relu(cos[upper] - margin).pow(2).sum()


def spread_out(vectors: np.ndarray, margin: float = 0.0, lr: float = 0.1, steps: int = 10) -> np.ndarray:
    """A few SGD steps of the spread-out loss on [n, d] class vectors; returns them L2-normalised."""
    if len(vectors) < 2:
        return vectors
    w = torch.tensor(vectors, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        spreadout_loss(w, margin).backward()
        optimizer.step()
    return F.normalize(w.detach(), dim=1).numpy().astype(np.float32)
