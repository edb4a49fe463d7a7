"""Secure aggregation with Flower's SecAgg+ (SecAggPlusWorkflow on the server, secaggplus_mod on the client).

Why Flower's protocol and not a home-made one: it is the SecAgg+ of Bell et al. (pairwise masks from ECDH
keys, Shamir shares of each client's mask seed and key so the masks of clients that drop mid-round can be
removed, up to the reconstruction threshold). Flower 1.41 runs it only from its legacy workflow API, so
`run_secagg` drives `SecAggPlusWorkflow` for ONE round inside privface's own round loop (server_app.py),
with a minimal legacy strategy that hands out the prepared fit instructions and receives the unmasked mean.

One change to Flower, on both sides: the mask expansion. Flower's `pseudo_rand_gen` folds the 32-byte seed
(os.urandom for the private mask, an ECDH+HKDF key for pairwise masks) into a 32-bit integer by XOR and
expands it with numpy's Mersenne Twister (`np.random.RandomState`): 2^32 candidate masks per seed, and MT's
output is predictable from its own output. The masks are what hides each client's update, so
`install_csprng_masks` replaces that one function, in the two Flower modules that call it, with a ChaCha20
keystream keyed by SHA-256(domain || seed) (full 256-bit key). Everything else is Flower's: ECDH on P-384
(`cryptography`), HKDF-SHA256, Fernet for the share transport, Shamir over GF(2^128) (PyCryptodome, keyed
from os.urandom), os.urandom(32) for the private mask seed. The stochastic rounding of the quantiser uses
numpy's global generator, which protects nothing (it only makes the rounding unbiased).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow import constant as workflow_constant
from flwr.serverapp.grid import Grid

# the modules, not the same-named functions their packages re-export
flower_client_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
flower_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
FITINS_PARAMETERS = "fitins.parameters"  # the legacy record a SecAgg+ training message carries
MASK_DOMAIN = b"privface/secagg+/mask/v1"


def chacha_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks uniform in [0, num_range) for each shape, from a ChaCha20 keystream keyed by the whole seed.

    num_range must be a power of two <= 2^32 (Flower requires a power of two), so masking 32-bit words is
    exactly uniform. Same signature and dtype (int64) as Flower's pseudo_rand_gen."""
    if num_range <= 0 or num_range > 2**32 or num_range & (num_range - 1):
        raise ValueError(f"mask range must be a power of two <= 2^32, not {num_range}")
    key = hashlib.sha256(MASK_DOMAIN + bytes(seed)).digest()
    sizes = [int(np.prod(dims, dtype=np.int64)) for dims in dimensions_list]
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u4").astype(np.int64) & (num_range - 1)
    masks, start = [], 0
    for dims, size in zip(dimensions_list, sizes):
        masks.append(words[start:start + size].reshape(dims))
        start += size
    return masks


def install_csprng_masks() -> None:
    """Make Flower's SecAgg+ client mod and server workflow expand masks with `chacha_masks` (both sides must)."""
    setattr(flower_client_mod, "pseudo_rand_gen", chacha_masks)  # modules found by name: their attributes are
    setattr(flower_workflow, "pseudo_rand_gen", chacha_masks)  # unknown to the type checker


install_csprng_masks()


def secagg_if_requested(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: Flower's secaggplus_mod for SecAgg+ messages, a pass-through for plain FedAvg ones (the mod
    itself refuses training messages that carry no SecAgg+ stage)."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return flower_client_mod.secaggplus_mod(message, context, call_next)
    return call_next(message, context)


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol's knobs. Updates (local - global) are small, so a small clipping range keeps the
    quantisation step fine: step = 2 * clipping_range / quantization_range per unit weight.
    The sum of `n` quantised vectors must stay below the modulus: n * quantization_range < modulus_range."""

    max_shares: int = 11  # neighbours per client (odd); all sampled clients when fewer
    clipping_range: float = 0.5
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: int = 4  # the FedAvg weight (photos) is capped at this on the client
    timeout: float | None = 600.0

    def shares_and_threshold(self, sampled: int) -> tuple[int, int]:
        """Each client's key is shared among `shares` neighbours (itself included); a strict majority of them
        is needed to rebuild it, so the server alone (with a minority of colluders) cannot unmask a client."""
        shares = sampled if sampled <= self.max_shares else self.max_shares | 1
        return shares, shares // 2 + 1

    def max_clients(self) -> int:
        return self.modulus_range // self.quantization_range - 1


class _OneRound(Strategy):
    """The legacy strategy hooks SecAggPlusWorkflow calls: hand out the prepared fit instructions, receive the
    securely aggregated weighted mean (the workflow sets it as every result's parameters)."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures: list[tuple[ClientProxy, FitRes] | BaseException] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:  # noqa: D102 - not used
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:  # noqa: D102
        return self.instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:  # noqa: D102
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
                           ) -> tuple[float | None, dict[str, Scalar]]:  # noqa: D102
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:  # noqa: D102
        return None


@dataclass
class SecAggOutcome:
    """One SecAgg+ round: the weighted mean of the replied vectors (None when the protocol halted: too few
    clients left for the threshold), and each surviving client's FitRes (metrics in clear, parameters = mean)."""

    mean: list[np.ndarray] | None
    results: list[tuple[int, FitRes]]
    failures: int
    shares: int
    threshold: int


def run_secagg(grid: Grid, context: Context, server_round: int, fitins: dict[int, FitIns],
               settings: SecAggSettings) -> SecAggOutcome:
    """Run SecAgg+ once over `fitins` (node id -> its fit instruction); see `SecAggOutcome`."""
    if not fitins:
        raise ValueError("SecAgg+ needs at least one client")
    if len(fitins) > settings.max_clients():
        raise ValueError(f"SecAgg+ sums at most {settings.max_clients()} clients without overflow, not {len(fitins)}")
    shares, threshold = settings.shares_and_threshold(len(fitins))
    run_id = grid.run.run_id
    instructions = [(GridClientProxy(node_id=node, grid=grid, run_id=run_id), ins) for node, ins in fitins.items()]
    strategy = _OneRound(instructions)
    legacy = LegacyContext(context, strategy=strategy)
    first = next(iter(fitins.values())).parameters
    legacy.state.config_records[workflow_constant.MAIN_CONFIGS_RECORD] = ConfigRecord(
        {workflow_constant.Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[workflow_constant.MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        first, keep_input=True)
    workflow = SecAggPlusWorkflow(shares if shares > 2 else 1.0, threshold if shares > 2 else 1.0,
                                  max_weight=float(settings.max_weight), clipping_range=settings.clipping_range,
                                  quantization_range=settings.quantization_range,
                                  modulus_range=settings.modulus_range, timeout=settings.timeout)
    workflow(grid, legacy)
    if strategy.results is None:
        return SecAggOutcome(None, [], len(fitins), shares, threshold)
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters) if strategy.results else None
    results = [(proxy.node_id, res) for proxy, res in strategy.results]
    return SecAggOutcome(mean, results, len(fitins) - len(results), shares, threshold)
