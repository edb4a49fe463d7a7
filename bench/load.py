"""Load test: concurrent clients against the real stack, 70% verify / 30% identify, a gallery of 1,000 subjects.

One stack per setting (gateway, both parties, dealer; SQLite; the bundled trained models, preset accurate),
all started and filled with the same gallery first; then the settings take turns: each round gives every
setting one window of `duration / rounds` seconds, so each sees the same share of the shared machine's load.

    python -m bench.load [--clients 16] [--duration 180] [--rounds 2] [--gallery 1000] \
        [--settings unpaced,tuned] [--out docs/results/load_full.json]

Settings: `tuned` = this gateway's defaults (one ONNX Runtime thread without spinning; MPC jobs paced by
secure/pacing.py); `unpaced` = the same without the pacer (every job sent at once, as before it); `main` = also
ORT's default session (PRIVFACE_ORT_THREADS=0: a spinning thread per core), the gateway before both changes;
`open-budget` = the defaults with the parties' match-job budget (20/s per link) and the pacer's rate lifted to
1,000/s, the in-flight cap kept: what the two parties' MPC can serve when the budget does not bind;
`open-budget-verify-alone` = the same with every verify job run alone (no verify coalescing in the parties'
workers, PRIVFACE_MPC_COALESCE_VERIFY=0: the MPC before it); `precheck-always` / `precheck-after-refusal` = the
defaults with the gateway's precheck before every MPC job, or only after a job on the gallery did not run at both
parties (PRIVFACE_PARTY_PRECHECK; two of the four party calls of a verify). `precheck-after-refusal` equals
`tuned` since that became the default; it keeps its name so that docs/results/load_precheck.json reruns as written.
Photos: LFW identities in no View-2 fold (never the held-out folds 6-10); each subject is enrolled with its first photo and probed with its second
(or the first again, under other noise). Every request carries a fresh nonce; the noisy features of each photo
are drawn once. Reported per setting and route: requests, throughput, p50/p95/p99 latency, errors (any
answer other than 200/201, or no answer), and the CPU-seconds per request of the gateway, each party and the dealer
(each with its child processes: a party's MPC worker).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from client.features import encode_features, fresh_rng, with_fresh_nonce
from client.features import FeaturePayload
from common.paths import PROJECT_ROOT
from devtools.localstack import NO_ABUSE_LIMITS, LocalStack
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.transform import TransformSpec
from bench.report import emit

BUNDLED = PROJECT_ROOT / "inference" / "bundled"
UNPACED = {"PRIVFACE_PARTY_JOBS_IN_FLIGHT": "100000", "PRIVFACE_PARTY_JOBS_PER_S": "100000",
           "PRIVFACE_PARTY_JOBS_BURST": "100000"}  # the gateway before its MPC job pacer (secure/pacing.py)
OPEN_BUDGET = {"PRIVFACE_PARTY_MATCH_RATE_PER_S": "1000", "PRIVFACE_PARTY_MATCH_BURST": "1000",
               "PRIVFACE_PARTY_JOBS_PER_S": "1000", "PRIVFACE_PARTY_JOBS_BURST": "1000"}  # what the MPC itself can do
SETTINGS: dict[str, dict[str, str]] = {"main": {"PRIVFACE_ORT_THREADS": "0", **UNPACED}, "unpaced": UNPACED,
                                       "tuned": {}, "open-budget": OPEN_BUDGET,
                                       "open-budget-verify-alone": {**OPEN_BUDGET, "PRIVFACE_MPC_COALESCE_VERIFY": "0"},
                                       "precheck-after-refusal": {"PRIVFACE_PARTY_PRECHECK": "after-refusal"},
                                       "precheck-always": {"PRIVFACE_PARTY_PRECHECK": "always"}}
VERIFY_SHARE = 0.7


def photo_pairs(count: int) -> list[tuple[str, str]]:
    """(enroll photo, probe photo) of `count` identities in no View-2 fold."""
    by_person: dict[str, list[str]] = {}
    for path in images_outside_pairs(lfw_dir()):
        by_person.setdefault(path.split("/")[0], []).append(path)
    people = sorted(by_person)[:count]
    if len(people) < count:
        raise SystemExit(f"only {len(people)} identities outside the View-2 folds")
    return [(by_person[p][0], by_person[p][1] if len(by_person[p]) > 1 else by_person[p][0]) for p in people]


def payloads(pairs: list[tuple[str, str]], spec: TransformSpec) -> tuple[list[FeaturePayload], list[FeaturePayload]]:
    """Noisy features (one OS-noise draw per photo and role) of every enroll and probe photo."""
    lfw = lfw_dir()
    enroll = [encode_features(spec.apply(face, fresh_rng()), spec) for face in load_many(lfw, [e for e, _ in pairs])]
    probe = [encode_features(spec.apply(face, fresh_rng()), spec) for face in load_many(lfw, [p for _, p in pairs])]
    return enroll, probe


def start_stack(workdir: Path, setting: str) -> LocalStack:
    env = {**NO_ABUSE_LIMITS, **SETTINGS[setting], "PRIVFACE_BUNDLED_MODEL_DIR": str(BUNDLED),
           "PRIVFACE_IDENTIFY_FPIR": "0.01"}
    return LocalStack(workdir / setting, model_dir=workdir / setting / "models", extra_env=env)


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[int, float, Any]:
    """(status or 0 when no answer, seconds, parsed body or the error)."""
    started = time.perf_counter()
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        return 0, time.perf_counter() - started, repr(exc)
    return response.status_code, time.perf_counter() - started, response.json()


async def enroll_gallery(stack: LocalStack, key: str, enroll: list[FeaturePayload],
                         clients: int) -> tuple[list[str], int]:
    """Create and enroll every subject (`clients` at a time); returns (subject ids, 503s retried).

    A 503 (a party unavailable for a moment; nothing was kept) is retried after a second with a fresh nonce, as
    the SDK does: the gallery must be complete before the load starts. The retries are reported."""
    subjects: list[str] = [""] * len(enroll)
    todo = iter(range(len(enroll)))
    retried = 0

    async def call(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
        nonlocal retried
        for _ in range(5):
            status, _, answer = await post(client, path, body)
            if status == 201:
                return answer
            if status not in (0, 503):
                break
            retried += 1
            await asyncio.sleep(1.0)
            body = {**body, "features": with_fresh_nonce(body["features"])} if "features" in body else body
        raise RuntimeError(f"POST {path}: {status} {answer}")

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            subjects[i] = (await call(client, "/v1/subjects", {"external_id": f"load-{i}"}))["id"]
            # a fresh nonce and created_at: on a loaded machine the gallery takes longer than the replay window
            await call(client, f"/v1/subjects/{subjects[i]}/enrollments", {"features": with_fresh_nonce(enroll[i])})

    async with _client(stack, key, clients) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return subjects, retried


def _client(stack: LocalStack, key: str, clients: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"authorization": f"Bearer {key}"}, timeout=120,
                             limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients))


async def load_window(stack: LocalStack, key: str, subjects: list[str], probes: list[FeaturePayload],
                      clients: int, seconds: float, seed: int) -> list[tuple[str, int, float, str]]:
    """(route, status, seconds, error text) of every request that `clients` concurrent clients made."""
    samples: list[tuple[str, int, float, str]] = []
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient, rng: random.Random) -> None:
        while time.perf_counter() < deadline:
            i = rng.randrange(len(subjects))
            features = with_fresh_nonce(probes[i])
            if rng.random() < VERIFY_SHARE:
                status, took, body = await post(client, "/v1/verify", {"subject_id": subjects[i], "features": features})
                route = "verify"
            else:
                status, took, body = await post(client, "/v1/identify", {"features": features})
                route = "identify"
            samples.append((route, status, took, "" if status == 200 else str(body)[:300]))

    async with _client(stack, key, clients) as client:
        await asyncio.gather(*(worker(client, random.Random(seed * 1000 + c)) for c in range(clients)))
    return samples


ROLES = ("gateway", "party0", "party1", "dealer")


def process_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and every live descendant (a party's MPC worker and fork server run as its
    children, the gateway's ORT work in the gateway itself)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while listed
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier and child not in tree]
        tree.update(frontier)
    total = 0.0
    for member in tree:
        try:
            total += process_cpu_s(member)
        except (OSError, ValueError, IndexError):
            continue
    return total


def stack_cpu_s(stack: LocalStack) -> dict[str, float]:
    return {role: tree_cpu_s(stack.processes[role].pid) for role in ROLES}


def summarise(samples: list[tuple[str, int, float, str]], seconds: float, cpu_s: dict[str, float]) -> dict[str, Any]:
    routes: dict[str, Any] = {}
    for route in ("verify", "identify"):
        took = np.array([s[2] for s in samples if s[0] == route]) * 1000
        routes[route] = {"requests": int(len(took)), "per_s": round(len(took) / seconds, 2),
                         **({f"p{q}_ms": round(float(np.percentile(took, q)), 1) for q in (50, 95, 99)}
                            if len(took) else {})}
    errors = [s for s in samples if s[1] != 200]
    return {"requests": len(samples), "per_s": round(len(samples) / seconds, 2), "seconds": round(seconds, 1),
            "routes": routes, "errors": len(errors),
            "errors_by_status": {str(k): v for k, v in sorted(collections.Counter(s[1] for s in errors).items())},
            "error_examples": sorted({f"{s[0]} {s[1]} {s[3]}" for s in errors})[:5],
            "gateway_cpu_s": round(cpu_s["gateway"], 1),
            "gateway_cpu_ms_per_request": round(1000 * cpu_s["gateway"] / max(len(samples), 1), 1),
            "cpu_ms_per_request": {role: round(1000 * cpu_s[role] / max(len(samples), 1), 1) for role in ROLES}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = args.settings.split(",")
    stacks = {name: start_stack(args.workdir, name) for name in settings}
    try:
        for stack in stacks.values():  # one at a time: each start imports torch and CrypTen in four processes
            stack.start(timeout=900)  # a shared machine under load takes minutes
        keys = {name: stack.api_key("enroll", "verify", "admin") for name, stack in stacks.items()}
        spec = TransformSpec.from_dict(httpx.get(stacks[settings[0]].url + "/v1/transforms", headers={
            "authorization": f"Bearer {keys[settings[0]]}"}).json()[0]["spec"])
        enroll, probes = payloads(photo_pairs(args.gallery), spec)
        started = time.perf_counter()  # every stack's gallery at once: the enrollment is not what is measured
        galleries = await asyncio.gather(*(enroll_gallery(stacks[name], keys[name], enroll, args.clients)
                                           for name in settings))
        subjects = {name: gallery[0] for name, gallery in zip(settings, galleries)}
        enroll_retries = {name: gallery[1] for name, gallery in zip(settings, galleries)}
        print(f"{args.gallery} subjects enrolled in each stack in {time.perf_counter() - started:.0f} s "
              f"(retried 503s: {enroll_retries})", flush=True)
        samples: dict[str, list] = {name: [] for name in settings}
        cpu = {name: dict.fromkeys(ROLES, 0.0) for name in settings}
        window = args.duration / args.rounds
        loads = [os.getloadavg()[0]]
        for round_no in range(args.rounds):
            for name in (settings if round_no % 2 == 0 else settings[::-1]):
                before = stack_cpu_s(stacks[name])
                samples[name] += await load_window(stacks[name], keys[name], subjects[name], probes, args.clients,
                                                   window, seed=round_no)
                after = stack_cpu_s(stacks[name])
                for role in ROLES:
                    cpu[name][role] += after[role] - before[role]
                loads.append(os.getloadavg()[0])
                print(f"round {round_no + 1} {name}: {len(samples[name])} requests so far, load {loads[-1]:.1f}",
                      flush=True)
    finally:
        for stack in stacks.values():
            stack.stop()
    return {"settings": {name: {"env": SETTINGS[name], "enroll_503_retried": enroll_retries[name],
                                **summarise(samples[name], args.duration, cpu[name])}
                         for name in settings},
            "clients": args.clients, "duration_s_per_setting": args.duration, "rounds": args.rounds,
            "gallery": args.gallery, "verify_share": VERIFY_SHARE, "model": "bundled v1-accurate (preset accurate)",
            "load_average_1min": {"min": round(min(loads), 1), "max": round(max(loads), 1)},
            "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load per setting")
    parser.add_argument("--rounds", type=int, default=2, help="windows per setting, taken in turns")
    parser.add_argument("--gallery", type=int, default=1000)
    parser.add_argument("--settings", default="unpaced,tuned", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--workdir", type=Path,
                        default=PROJECT_ROOT / "var" / "bench-load" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
    report = asyncio.run(run(args))
    report["command"] = "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:])
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
