"""The seed-recovery attack of issue 9, run against the old and the new mask construction.

    python -m bench.seed_recovery [--window-bits 20]

Old (CrypTen 0.4.1 TTP): the dealer draws each party's generator seed with ``torch.randint`` from its default
Mersenne Twister; torch uses 32 bits of a seed, so party 0 searches dealer states for the one whose first draw is
its own seed and reads party 1's seed as the second draw. Here the dealer's state is placed at random inside a
reduced window of 2^window_bits states (the full attack is 2^32: hours on one core, minutes on a GPU).
New (secure/mpc/runtime/crypten_rng.py): party 0's stream comes from its own X25519 agreement with the dealer; the same
search, fed party 0's first draw, finds nothing, and party 1's masks are unrelated to party 0's view.
Prints one JSON line per construction.
"""
from __future__ import annotations

import argparse
import json
import secrets
import time

import torch


def _draw_seed_pair(state: int) -> tuple[int, int]:
    g = torch.Generator().manual_seed(state)
    first, second = (int(torch.randint(-(2**63), 2**63 - 1, size=(), generator=g)) for _ in range(2))
    return first, second


def search(own_seed: int, window_bits: int) -> tuple[int | None, int]:
    """(party 1's seed or None, states tried)."""
    g = torch.Generator()
    for state in range(1 << window_bits):
        g.manual_seed(state)
        if int(torch.randint(-(2**63), 2**63 - 1, size=(), generator=g)) == own_seed:
            return int(torch.randint(-(2**63), 2**63 - 1, size=(), generator=g)), state + 1
    return None, 1 << window_bits


def masks_from_seed(seed: int, n: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.long)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-bits", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    seed0, seed1 = _draw_seed_pair(secrets.randbelow(1 << args.window_bits))
    t0 = time.perf_counter()
    found, tried = search(seed0, args.window_bits)
    elapsed = time.perf_counter() - t0
    replayed = found is not None and torch.equal(masks_from_seed(found), masks_from_seed(seed1))
    print(json.dumps({"construction": "old (torch.randint seeds)", "window_bits": args.window_bits,
                      "recovered_party1_seed": found == seed1, "party1_masks_replayed": replayed,
                      "states_tried": tried, "seconds": round(elapsed, 1),
                      "full_2^32_core_hours": round(elapsed / tried * 2**32 / 3600, 1)}))

    from secure.mpc.runtime import crypten_rng

    k0, k1 = secrets.token_bytes(32), secrets.token_bytes(32)  # two independent X25519 session keys
    own = int(crypten_rng.generators_for(k0)[0].ring((1,))[0])
    t0 = time.perf_counter()
    found, tried = search(own, args.window_bits)
    party1 = crypten_rng.generators_for(k1)[0].ring((1024,))
    replayed = found is not None and torch.equal(masks_from_seed(found), party1)
    print(json.dumps({"construction": "new (AES-CTR from X25519 session keys)", "window_bits": args.window_bits,
                      "recovered_party1_seed": found is not None, "party1_masks_replayed": replayed,
                      "states_tried": tried, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
