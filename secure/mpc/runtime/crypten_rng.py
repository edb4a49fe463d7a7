"""CrypTen's correlated randomness from AES-CTR instead of torch generators.

CrypTen's TTP provider gives each party a ``torch.Generator`` seeded by the dealer with ``torch.randint`` draws:
Mersenne Twister, whose seed torch cuts to 32 bits, so party 0 can search the dealer's state from its own seed and
replay party 1's masks (every Beaver triple, every fixed-gallery mask). ``install()`` replaces that, in every
process that loads CrypTen (``crypten_compat.load_crypten``):

* the TTP set-up (``TTPClient._setup_generators`` at the parties, ``Dealer._setup_generators`` in ``worker.py``)
  agrees one session key per party-dealer link (``link_keys.py``) and builds ``prg.RingGenerator`` streams from
  it (``prg.derive_key`` per purpose); no seed travels;
* CrypTen's draw functions (``crypten.common.rng.generate_random_ring_element`` / ``generate_kbit_random_tensor``,
  and the copies its modules imported by name) serve a ``RingGenerator`` from AES-CTR;
* with the TTP provider they refuse to draw from CrypTen's per-process "local" torch generator (or none), which
  only the test-only TFP provider uses. The pairwise "prev"/"next" generators stay: with two parties both hold
  both of their seeds and the zero-sharings they make cancel (they hide nothing and need not; docs/security.md).
"""
from __future__ import annotations

from typing import Any

from secure.mpc.primitives import prg
from secure.mpc.runtime import link_keys

_state: dict[str, Any] = {"secret": b"", "installed": False}

# modules that bound the draw functions by name at import time
_RNG_USERS = ("crypten.common.rng", "crypten.mpc.provider.ttp_provider", "crypten.mpc.provider.tfp_provider",
              "crypten.mpc.primitives.binary", "crypten.mpc.primitives.arithmetic")


class InsecureDraw(RuntimeError):
    """A draw of protective randomness was about to come from a torch generator."""


def configure(dealer_secret: bytes) -> None:
    """This party's credential for its link with the dealer (before ``crypten.init()``)."""
    _state["secret"] = dealer_secret


def session_key() -> bytes:
    """The key this party agreed with the dealer for the current session (after ``crypten.init()``)."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    key = getattr(TTPClient.get(), "privface_session_key", None)
    if not isinstance(key, bytes):
        raise RuntimeError("no dealer session key: CrypTen was initialised without the TTP provider")
    return key


def generators_for(key: bytes) -> tuple[prg.RingGenerator, prg.RingGenerator | None]:
    """The CPU (and, with a GPU, CUDA) generators of one party-dealer session key; the dealer builds the same."""
    import torch

    cpu = prg.RingGenerator(prg.derive_key(key, prg.PURPOSE_TTP), "cpu")
    cuda = prg.RingGenerator(prg.derive_key(key, prg.PURPOSE_TTP_CUDA), "cuda") if torch.cuda.is_available() else None
    return cpu, cuda


def _party_setup_generators(self: Any) -> None:
    """Replaces ``TTPClient._setup_generators``: agree a session key with the dealer, derive the streams."""
    import crypten.communicator as comm

    rank, dealer = comm.get().get_rank(), comm.get().get_ttp_rank()
    key = link_keys.agree_over_gloo(rank, dealer, _state["secret"], f"party{rank}-dealer")
    self.privface_session_key = key
    self.generator, self.generator_cuda = generators_for(key)


def install() -> None:
    """Route CrypTen's draws and its TTP set-up through AES-CTR (idempotent)."""
    if _state["installed"]:
        return
    import importlib

    from crypten.common import rng

    original_ring, original_kbit = rng.generate_random_ring_element, rng.generate_kbit_random_tensor

    def ring_element(size: Any, ring_size: int = 2**64, generator: Any = None, **kwargs: Any) -> Any:
        if isinstance(generator, prg.RingGenerator):
            if ring_size != 2**64:
                raise ValueError("only the 2^64 ring is served from AES-CTR")
            return generator.ring(size)
        _refuse_local(generator)
        return original_ring(size, ring_size=ring_size, generator=generator, **kwargs)

    def kbit_tensor(size: Any, bitlength: int | None = None, generator: Any = None, **kwargs: Any) -> Any:
        if isinstance(generator, prg.RingGenerator):
            return generator.kbit(size, 64 if bitlength is None else int(bitlength))
        _refuse_local(generator)
        return original_kbit(size, bitlength=bitlength, generator=generator, **kwargs)

    for name in _RNG_USERS:
        module = importlib.import_module(name)
        # patches of CrypTen's modules, on purpose (setattr: the modules are untyped)
        if hasattr(module, "generate_random_ring_element"):
            setattr(module, "generate_random_ring_element", ring_element)  # noqa: B010
        if hasattr(module, "generate_kbit_random_tensor"):
            setattr(module, "generate_kbit_random_tensor", kbit_tensor)  # noqa: B010

    from crypten.mpc.provider.ttp_provider import TTPClient

    TTPClient._TTPClient__TTPClient._setup_generators = _party_setup_generators
    _state["installed"] = True


def _refuse_local(generator: Any) -> None:
    """With the TTP provider nothing may draw from CrypTen's local torch generator (or an implicit one)."""
    import crypten

    if crypten.cfg.mpc.provider != "TTP":
        return  # the test-only TFP provider draws its triples from the local generator by design
    local = crypten.generators.get("local", {})
    if generator is None or any(generator is g for g in local.values()):
        raise InsecureDraw("refused: protective randomness from a torch generator (TTP provider)")
