"""Rényi-DP accounting of the Gaussian mechanism a DP federated job runs once per round (no flwr needed).

A round releases mean(clipped updates) + N(0, (σ·C/n)²): the sum of the n clipped updates (each of L2 norm
<= C) plus Gaussian noise of std σ·C, i.e. a Gaussian mechanism of noise multiplier σ on the sum, whose
sensitivity to adding or removing one client is C. Two accountings, both composed over rounds (RDP adds up):

- `epsilon` (no amplification; what the job reports as its guarantee): RDP(α) = α / (2σ²) per round, exact
  for the Gaussian mechanism whatever the sampling (Mironov 2017, Prop. 7). It does not depend on how clients
  were sampled, so it holds for the server's fixed-size sampling without replacement.
- `epsilon_poisson` (for reference): the sampled Gaussian mechanism at rate q = clients_per_round / clients,
  integer orders, Mironov, Talwar & Zhang 2019 ("Rényi Differential Privacy of the Sampled Gaussian
  Mechanism", Sec. 3.3): A_α = Σ_k C(α,k) (1−q)^(α−k) q^k exp((k²−k)/(2σ²)), RDP(α) = log(A_α)/(α−1). It
  assumes each client joins each round independently with probability q (Poisson), which the server's
  seeded fixed-size sample is not: a figure to compare with the literature, not a guarantee of this job.

RDP → (ε, δ): ε = min_α RDP_total(α) + log(1/δ)/(α−1) (Mironov 2017, Prop. 3), over the orders below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# real orders for the closed form; integer orders (the Poisson formula needs integers) up to 256
REAL_ORDERS = tuple(float(a) for a in np.concatenate([np.linspace(1.01, 10.0, 899), np.arange(11.0, 513.0)]))
INTEGER_ORDERS = tuple(range(2, 257))


def rdp_gaussian(noise_multiplier: float, orders: tuple[float, ...] = REAL_ORDERS) -> np.ndarray:
    """RDP of one Gaussian mechanism (sensitivity 1, std σ) at each order: α / (2σ²)."""
    return np.asarray(orders, dtype=np.float64) / (2.0 * noise_multiplier ** 2)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, orders: tuple[int, ...] = INTEGER_ORDERS) -> np.ndarray:
    """RDP of the Poisson-sampled Gaussian mechanism at integer orders (log-space binomial sum)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], not {q}")
    if q == 1.0:
        return rdp_gaussian(noise_multiplier, tuple(float(a) for a in orders))
    out = []
    for alpha in orders:
        terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                 + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2.0 * noise_multiplier ** 2)
                 for k in range(alpha + 1)]
        out.append(_logsumexp(terms) / (alpha - 1))
    return np.asarray(out, dtype=np.float64)


def epsilon_from_rdp(rdp: np.ndarray, orders: tuple[float, ...], delta: float) -> tuple[float, float]:
    """(ε, the order that gives it) for the total RDP curve at δ."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    alphas = np.asarray(orders, dtype=np.float64)
    eps = rdp + math.log(1.0 / delta) / (alphas - 1.0)
    best = int(np.argmin(eps))
    return float(eps[best]), float(alphas[best])


@dataclass(frozen=True)
class DpAccount:
    """(ε, δ) after `rounds` rounds of the Gaussian mechanism with noise multiplier σ."""

    noise_multiplier: float
    delta: float
    sample_rate: float  # clients_per_round / clients (only the Poisson reference figure uses it)

    def after(self, rounds: int) -> dict[str, Any]:
        if self.noise_multiplier <= 0:  # clipping only: no privacy guarantee
            return {"rounds": rounds, "delta": self.delta, "epsilon": None, "epsilon_poisson": None,
                    "note": "noise_multiplier 0: clipping only, no differential privacy"}
        eps, order = epsilon_from_rdp(rounds * rdp_gaussian(self.noise_multiplier), REAL_ORDERS, self.delta)
        eps_q, _ = epsilon_from_rdp(rounds * rdp_sampled_gaussian(self.sample_rate, self.noise_multiplier),
                                    tuple(float(a) for a in INTEGER_ORDERS), self.delta)
        return {"rounds": rounds, "delta": self.delta, "epsilon": eps, "order": order, "epsilon_poisson": eps_q}
