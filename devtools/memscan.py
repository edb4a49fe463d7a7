"""Search a live process's memory for byte strings (tests of what a server holds in the clear; Linux, as root).

A test hands the PIDs of a real privface process (``LocalStack.processes[name].pid``); ``process_tree`` adds its
children (uvicorn workers, MPC workers), ``find_in_memory`` reads every readable mapping of each through
``/proc/<pid>/mem`` and says which probes occur. Reading needs ptrace access to the process: root, or the
same user with ``kernel.yama.ptrace_scope`` 0; ``can_read_memory`` tells a test whether to skip.

The read is of the live process, not a frozen core: what a request leaves in freed but not yet reused heap
is there to be found, which is what a memory dump of a compromised gateway would show.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
SKIPPED = ("[vvar]", "[vsyscall]", "[vvar_vclock]")  # kernel pages: reading them fails or says nothing
CHUNK = 64 << 20  # read large mappings in pieces, overlapping by the longest probe
HASH = np.uint64(0x9E3779B97F4A7C15)  # Knuth's multiplicative hash constant (2^64 / golden ratio)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (children read from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(child) for child in task.read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
    return found


def can_read_memory(pid: int) -> bool:
    """Whether this process may read ``pid``'s memory (root, or ptrace allowed)."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0):
            return True
    except OSError:
        return False


def readable_regions(pid: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each readable mapping of ``pid`` that the process can have written: anonymous and
    writable ones (heap, stacks, arenas, numpy/torch buffers). Read-only mappings of files (the code and constants
    of the interpreter and of torch's libraries, most of the address space) hold the file's bytes, not a request's,
    and kernel pages are left out."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        match = MAPPING.match(line)
        if not match or match.group(3)[0] != "r" or match.group(4).strip() in SKIPPED:
            continue
        if match.group(3)[1] == "w" or not match.group(4).startswith("/"):
            yield int(match.group(1), 16), int(match.group(2), 16)


def _pieces(mem: int, start: int, end: int, overlap: int) -> Iterator[bytes]:
    """A mapping's bytes in pieces of CHUNK, each overlapping the previous by ``overlap`` (a multiple of 8, so
    every piece starts on an 8-byte boundary like the mapping); an unreadable piece (a guard page, a mapping that
    went away) ends the mapping."""
    offset = start
    while offset < end:
        try:
            data = os.pread(mem, min(CHUNK + overlap, end - offset), offset)
        except OSError:
            return
        if not data:
            return
        yield data
        if offset + len(data) >= end:
            return
        offset += max((len(data) - overlap) // 8 * 8, 8)


def _hash(words: np.ndarray) -> np.ndarray:
    """16 bits of a multiplicative hash of each 64-bit word (a table index)."""
    return ((words * HASH) >> np.uint64(48)).astype(np.intp)


class ProbeIndex:
    """Finds many probes in one pass over a piece of memory.

    Wherever a probe of 15 bytes or more sits, one of the 8-byte-aligned words of memory lies inside its first 15
    bytes, at the probe's offset k = (-address) mod 8; so the index holds each probe's words at k = 0..7, and a
    piece is read as aligned words, filtered through a hash table of those words (one vectorised pass), and only
    the exact word hits are compared with the whole probe."""

    def __init__(self, probes: dict[str, bytes]) -> None:
        self.probes = probes
        self.words: dict[int, list[tuple[str, int]]] = {}
        for name, probe in probes.items():
            if len(probe) < 15:
                raise ValueError(f"probe {name!r} is shorter than 15 bytes")
            for k in range(8):
                self.words.setdefault(int.from_bytes(probe[k:k + 8], "little"), []).append((name, k))
        self.keys = np.array(sorted(self.words), dtype=np.uint64)
        self.table = np.zeros(1 << 16, dtype=bool)
        self.table[_hash(self.keys)] = True

    def search(self, data: bytes) -> set[str]:
        """The names of the probes in ``data`` (which starts on an 8-byte boundary of the address space)."""
        words = np.frombuffer(data, dtype="<u8", count=len(data) // 8)
        at = np.flatnonzero(self.table[_hash(words)])
        at = at[np.isin(words[at], self.keys)]
        found = set()
        for i in at.tolist():
            for name, k in self.words[int(words[i])]:
                start, probe = 8 * i - k, self.probes[name]
                if start >= 0 and data[start:start + len(probe)] == probe:
                    found.add(name)
        return found


def find_in_memory(pids: Iterable[int], probes: dict[str, bytes]) -> tuple[set[str], int]:
    """The names of the probes (15 bytes or more each) found anywhere in the memory of ``pids`` that their
    processes can have written (``readable_regions``), and the bytes read (a test asserts it is not 0)."""
    index = ProbeIndex(probes)
    overlap = -(-max((len(p) for p in probes.values()), default=0) // 8) * 8
    found: set[str] = set()
    read = 0
    for pid in pids:
        try:
            mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError:  # the process ended meanwhile
            continue
        try:
            for start, end in readable_regions(pid):
                for data in _pieces(mem, start, end, overlap):
                    read += len(data)
                    found |= index.search(data)
        except OSError:
            continue
        finally:
            os.close(mem)
    return found, read
