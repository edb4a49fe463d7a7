"""Windowed counters and flags for the abuse controls: in Redis when configured, in-process otherwise.

Every operation is atomic (one Lua script in Redis, one lock in-process), so concurrent requests and
several gateway workers sharing Redis never spend more than a budget allows. A window starts at its
first hit and ends `window_s` later (a fixed window per key, kept as the key's expiry).
Without Redis each gateway worker counts on its own (production runs Redis).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis

# KEYS: the counters; ARGV: limit_1, window_ms_1, limit_2, window_ms_2, ...
# Refuse (returning the longest wait in ms) when any counter is at its limit, else increment them all.
_TAKE = """
local wait = -1
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('GET', key) or '0')
  if count >= tonumber(ARGV[2 * i - 1]) then
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then ttl = tonumber(ARGV[2 * i]) end
    if ttl > wait then wait = ttl end
  end
end
if wait >= 0 then return wait end
for i, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, ARGV[2 * i]) end
end
return -1
"""

# KEYS: failures counter, flag; ARGV: threshold, window_ms, flag_ms (0: no expiry).
# Count one more failure; at the threshold set the flag and clear the counter. Returns 1 when it set the flag.
_FAIL = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if count < tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[2], 1, 'PX', ARGV[3]) else redis.call('SET', KEYS[2], 1) end
return 1
"""


@dataclass(frozen=True)
class Budget:
    """At most `limit` hits on `key` per `window_s` seconds."""

    key: str
    limit: int
    window_s: float


class Counters(Protocol):
    def take(self, budgets: list[Budget]) -> float | None:
        """Spend one hit of every budget, all or none; None when spent, else the seconds until one frees up."""

    def fail(self, counter: str, flag: str, threshold: int, window_s: float, flag_s: float) -> bool:
        """Count a failure; at `threshold` within `window_s`, raise `flag` for `flag_s` (0: until cleared)."""

    def flag_wait(self, flag: str) -> float | None:
        """None when `flag` is down; else the seconds it stays up (math.inf: until cleared)."""

    def clear(self, *keys: str) -> bool:
        """Delete keys; True when any existed."""


class RedisCounters:
    def __init__(self, client: redis.Redis, prefix: str = "privface:abuse:") -> None:
        self._redis, self._prefix = client, prefix
        self._take, self._fail = client.register_script(_TAKE), client.register_script(_FAIL)

    def take(self, budgets: list[Budget]) -> float | None:
        keys = [self._prefix + b.key for b in budgets]
        args = [v for b in budgets for v in (b.limit, max(1, int(b.window_s * 1000)))]
        wait_ms = int(self._take(keys=keys, args=args))
        return None if wait_ms < 0 else wait_ms / 1000

    def fail(self, counter: str, flag: str, threshold: int, window_s: float, flag_s: float) -> bool:
        args = [threshold, max(1, int(window_s * 1000)), int(flag_s * 1000)]
        return bool(self._fail(keys=[self._prefix + counter, self._prefix + flag], args=args))

    def flag_wait(self, flag: str) -> float | None:
        ttl_ms = int(self._redis.pttl(self._prefix + flag))
        if ttl_ms == -2:
            return None
        return math.inf if ttl_ms == -1 else ttl_ms / 1000

    def clear(self, *keys: str) -> bool:
        return bool(self._redis.delete(*(self._prefix + k for k in keys)))


class MemoryCounters:
    """The same semantics in one process: values with monotonic-clock deadlines (math.inf: none)."""

    PRUNE_ABOVE = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, float]] = {}

    def _get(self, key: str, now: float) -> tuple[int, float] | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] <= now:
            del self._values[key]
            return None
        return entry

    def _prune(self, now: float) -> None:
        if len(self._values) > self.PRUNE_ABOVE:
            for key in [k for k, (_, deadline) in self._values.items() if deadline <= now]:
                del self._values[key]

    def take(self, budgets: list[Budget]) -> float | None:
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            entries = {b.key: self._get(b.key, now) for b in budgets}
            waits = [entry[1] - now for b in budgets
                     if (entry := entries[b.key]) is not None and entry[0] >= b.limit]
            if waits:
                return max(waits)
            for b in budgets:
                count, deadline = entries[b.key] or (0, now + b.window_s)
                self._values[b.key] = (count + 1, deadline)
            return None

    def fail(self, counter: str, flag: str, threshold: int, window_s: float, flag_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            count, deadline = self._get(counter, now) or (0, now + window_s)
            if count + 1 < threshold:
                self._values[counter] = (count + 1, deadline)
                return False
            self._values.pop(counter, None)
            self._values[flag] = (1, now + flag_s if flag_s > 0 else math.inf)
            return True

    def flag_wait(self, flag: str) -> float | None:
        now = time.monotonic()
        with self._lock:
            entry = self._get(flag, now)
        return None if entry is None else entry[1] - now

    def clear(self, *keys: str) -> bool:
        with self._lock:
            return any([self._values.pop(k, None) is not None for k in keys])
