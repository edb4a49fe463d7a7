"""Time to serve again after a party or the dealer restarts (issue 13: 13-30 s before; target <= 5 s).

Starts the real local stack, enrolls one face, then per role and round: SIGKILL the process, start it again at
once, and send a verify every ``poll_s`` until one succeeds. Reports, per restart, the seconds from the new
process's start to the first successful verify (``ready_s``), from the kill (``since_kill_s``), and every
answer in the gap (each must be a 503 with Retry-After; ``tests/test_gateway_restart.py`` asserts it).

    python -m bench.restart [--roles party0 party1 dealer] [--rounds 3] [--out docs/results/restart.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from pathlib import Path

import httpx

from devtools.localstack import NO_ABUSE_LIMITS, LocalStack

ROLES = ("party0", "party1", "dealer")


def verify_until_ok(stack: LocalStack, key: str, subject: str, features: Callable[[], dict], limit_s: float,
                    poll_s: float = 0.1) -> tuple[float | None, list[dict]]:
    """Verify every ``poll_s`` until one answers 200 (returns when, monotonic) or ``limit_s`` passes."""
    answers: list[dict] = []
    deadline = time.monotonic() + limit_s
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        while time.monotonic() < deadline:
            sent = time.monotonic()
            response = http.post("/v1/verify", json={"subject_id": subject, "features": features()})
            done = time.monotonic()
            if response.status_code == 200:
                return done, answers
            answers.append({"status": response.status_code, "retry_after": response.headers.get("retry-after"),
                            "took_s": round(done - sent, 2), "detail": response.json().get("detail", "")[:200]})
            time.sleep(max(0.0, poll_s - (done - sent)))
    return None, answers


def restart_once(stack: LocalStack, key: str, subject: str, features: Callable[[], dict], role: str,
                 limit_s: float = 90) -> dict:
    """SIGKILL ``role``, start it again at once, and time the first successful verify."""
    killed = time.monotonic()
    stack.kill(role)
    stack.start_process(role)
    started = time.monotonic()
    ok_at, answers = verify_until_ok(stack, key, subject, features, limit_s)
    return {"role": role, "ready_s": None if ok_at is None else round(ok_at - started, 2),
            "since_kill_s": None if ok_at is None else round(ok_at - killed, 2),
            "gap_statuses": dict(Counter(a["status"] for a in answers)), "gap": answers}


def enrolled_subject(stack: LocalStack, key: str, features: Callable[[], dict]) -> str:
    """A subject with one enrollment, for the verifies."""
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        subject = http.post("/v1/subjects", json={}).json()["id"]
        enrolled = http.post(f"/v1/subjects/{subject}/enrollments", json={"features": features()})
        enrolled.raise_for_status()
    return subject


def main(argv: list[str] | None = None) -> None:
    from common.paths import shared_dir
    from tests.test_gateway_api import aligned_face, payload
    from tests.test_gateway_recovery import FACES, served_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench-restart"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    stack = LocalStack(args.workdir / time.strftime("%Y%m%d-%H%M%S"), extra_env=NO_ABUSE_LIMITS).start()
    try:
        key = stack.api_key("enroll", "verify")
        spec, face = served_spec(stack, key), aligned_face(shared_dir(), FACES[0])

        def features() -> dict:
            return payload(spec, face)

        subject = enrolled_subject(stack, key, features)
        runs = []
        for _ in range(args.rounds):
            for role in args.roles:
                verify_until_ok(stack, key, subject, features, limit_s=120)  # start each round from a ready stack
                runs.append(restart_once(stack, key, subject, features, role))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "gap"}), flush=True)
    finally:
        stack.stop()
    per_role: dict[str, dict[str, Any]] = {role: {"ready_s": [r["ready_s"] for r in runs if r["role"] == role]}
                                           for role in args.roles}
    for role, entry in per_role.items():
        done = [v for v in entry["ready_s"] if v is not None]
        entry["median_s"] = statistics.median(done) if done else None
        entry["max_s"] = max(done) if done else None
    load_average_1m = [round(load_before, 1), round(os.getloadavg()[0], 1)]  # at start, at end
    summary: dict[str, object] = {**per_role, "load_average_1m": load_average_1m}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
