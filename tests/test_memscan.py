"""devtools/memscan.py, the memory search behind the sealed-mode memory-dump test: it finds bytes that another
process holds, at any alignment and across its read pieces, and nothing that the process never had."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from devtools import memscan
from devtools.memscan import can_read_memory, find_in_memory, process_tree

HOLDER = """
import sys, time
secret = bytes.fromhex(sys.argv[1])
held = [bytearray(b"\\0" * 3 + secret), bytearray(b"\\0" * 20_000_000)]  # at an odd offset; pages of zeros
print("ready", flush=True)
time.sleep(120)
"""


def test_finds_what_another_process_holds_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = os.urandom(4096)
    never = os.urandom(4096)
    child = subprocess.Popen([sys.executable, "-c", HOLDER, secret.hex()], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        if not can_read_memory(child.pid):
            pytest.skip("reading another process's memory needs root (or ptrace_scope 0)")
        assert process_tree(child.pid) == [child.pid]
        probes = {f"held +{shift}": secret[shift: shift + 15 + 7 * shift] for shift in range(8)}
        probes.update({"never": never[:64], "held, then altered": secret[100:160] + bytes([secret[160] ^ 1])})  # never what follows
        monkeypatch.setattr(memscan, "CHUNK", 4096)  # small pieces: probes straddle piece boundaries too
        found, read = find_in_memory([child.pid], probes)
        assert read > 20_000_000
        assert found == {f"held +{shift}" for shift in range(8)}, found
        with pytest.raises(ValueError):
            find_in_memory([child.pid], {"too short": secret[:14]})
    finally:
        child.kill()
        child.wait()


def test_the_word_index_sees_each_alignment() -> None:
    """Every placement of a probe relative to 8-byte words is found (one of its first 8 words is aligned)."""
    probe = os.urandom(40)
    index = memscan.ProbeIndex({"p": probe})
    for shift in range(16):
        data = np.zeros(256, dtype=np.uint8).tobytes()
        data = data[:shift] + probe + data[shift + len(probe):]
        assert index.search(data) == {"p"}, shift
    assert index.search(bytes(256)) == set()
