"""What the federated test modules share: the shared data folder, whether its faces and the pretrained network
are there, and torch on one thread for the module.

A plain module, not conftest: tests/test_federated.py also runs in .venv-federated with --noconftest. A module
takes the fixture by importing it (`from tests.federated_data import one_thread  # noqa: F401`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from inference.lfw import lfw_dir, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH

SHARED = shared_dir()
LFW = lfw_dir(SHARED)
HAVE_DATA = (LFW / "pairs.txt").exists() and (SHARED / WEIGHTS_SUBPATH).exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"aligned LFW or MobileFaceNet absent under {SHARED}")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """torch on one thread for the module (the shared 2-core machine), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
