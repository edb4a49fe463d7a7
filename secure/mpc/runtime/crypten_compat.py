"""How every process loads CrypTen (0.4.1): with the shims it needs on torch >= 2.9 and our randomness installed.

CrypTen imports ``torch.onnx._internal.registration``, which moved to
``torch.onnx._internal.torchscript_exporter.registration``; an alias in ``sys.modules`` before the import fixes it.
Call ``load_crypten()`` before any other use of CrypTen: it installs the shims and routes CrypTen's randomness
through AES-CTR (``crypten_rng.py``). Other modules of ``secure/mpc`` (protocols, the dealer, ``crypten_rng``)
import CrypTen or its submodules (the TTP provider, the communicator, its rng) only inside functions that run after
that load; no module, this one included, imports CrypTen at module level (tests/test_docs_claims.py checks it).
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType


def _install_shims() -> None:
    import torch  # noqa: F401
    import torch.onnx  # noqa: F401

    name = "torch.onnx._internal.registration"
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    moved = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
    sys.modules[name] = moved


def load_crypten() -> ModuleType:
    """Import CrypTen with the compatibility shims installed; returns the ``crypten`` module."""
    if "crypten" in sys.modules:
        from secure.mpc.runtime import crypten_rng

        crypten_rng.install()
        loaded: ModuleType = sys.modules["crypten"]
        return loaded
    _install_shims()
    import crypten as _crypten  # noqa: PLC0415  (the one sanctioned import)

    from secure.mpc.runtime import crypten_rng

    crypten_rng.install()  # CrypTen's correlated randomness from AES-CTR, never torch generators
    module: ModuleType = _crypten
    return module


def __getattr__(attr: str) -> ModuleType:  # lazy ``from secure.mpc.runtime.crypten_compat import crypten``
    if attr == "crypten":
        return load_crypten()
    raise AttributeError(attr)
