"""Local 3-process MPC cluster (dealer + party 0 + party 1, each a real ``python -m devtools.mpc_driver`` process).

Used by tests/test_mpc_*.py and bench/mpc_naive.py; not used by the service. It also holds the plaintext
helpers (encode + split) the tests use to make shares.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from common.paths import PROJECT_ROOT as ROOT
from devtools.net import free_port

Replies = queue.Queue[dict[str, Any]]  # the JSON replies to one request, by tag


def encode_trunc(x: np.ndarray) -> np.ndarray:
    """CrypTen's encoder: x * 2^16 truncated toward zero, int64."""
    return np.trunc(np.asarray(x, dtype=np.float64) * 65536.0).astype(np.int64)


def split(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s0 = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=x.shape, dtype=np.int64,
                      endpoint=True)
    s1 = (x.view(np.uint64) - s0.view(np.uint64)).view(np.int64)
    return s0, s1


def reconstruct(a: int, b: int) -> int:
    v = (int(a) + int(b)) % (1 << 64)
    return v - (1 << 64) if v >= (1 << 63) else v


class _Proc:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115
        self.p = subprocess.Popen([sys.executable, "-m", "devtools.mpc_driver", *args], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.replies: dict[str, Replies] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                q = self.replies.setdefault(str(msg.get("tag")), queue.Queue())
            q.put(msg)

    def send(self, req: dict[str, Any]) -> Replies:
        tag = req.setdefault("tag", uuid.uuid4().hex)
        with self.lock:
            q = self.replies.setdefault(tag, queue.Queue())
        assert self.p.stdin is not None
        self.p.stdin.write((json.dumps(req) + "\n").encode())
        self.p.stdin.flush()
        return q

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        self.log.close()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.p.wait(5)
            except Exception:  # noqa: BLE001
                pass
        self.kill()


class Cluster:
    """Dealer + two parties on loopback with a free port. ``settings`` are PRIVFACE_MPC_* overrides."""

    def __init__(self, workdir: Path | None = None, **settings: Any) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="privface-mpc-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["PRIVFACE_MPC_MASTER_PORT"] = str(settings.pop("master_port", free_port()))
        for key, val in settings.items():
            self.env[f"PRIVFACE_MPC_{key.upper()}"] = str(val)
        self.parties: list[_Proc | None] = [None, None]
        self.dealer: _Proc | None = None
        self.provider = self.env.get("PRIVFACE_MPC_PROVIDER", "TTP")
        self.last_stats: list[dict[str, Any] | None] = [None, None]  # per party, of the last run()

    def start(self) -> Cluster:
        if self.provider == "TTP":
            self.dealer = _Proc(["dealer"], self.env, self.dir / "dealer.log")
        for rank in (0, 1):
            self.start_party(rank)
        return self

    def start_party(self, rank: int) -> None:
        self.parties[rank] = _Proc(["party", "--rank", str(rank)], self.env, self.dir / f"party{rank}.log")

    def kill_party(self, rank: int) -> None:
        proc = self.parties[rank]
        if proc is not None:
            proc.kill()

    def party(self, rank: int) -> _Proc:
        proc = self.parties[rank]
        if proc is None:
            raise RuntimeError(f"party {rank} was never started")
        return proc

    def status(self, rank: int, timeout: float = 10) -> dict[str, Any]:
        reply: dict[str, Any] = self.party(rank).send({"cmd": "status"}).get(timeout=timeout)["status"]
        return reply

    def forget_rows(self, rank: int, timeout: float = 10) -> None:
        """Party ``rank`` drops its copies of gallery rows, as after a committed delete."""
        self.party(rank).send({"cmd": "forget"}).get(timeout=timeout)

    def wait_connected(self, timeout: float = 60) -> None:
        qs = [self.party(rank).send({"cmd": "wait", "timeout": timeout}) for rank in (0, 1)]
        for rank, q in enumerate(qs):
            msg = q.get(timeout=timeout + 10)
            if not msg["connected"]:
                raise TimeoutError(f"party {rank} not connected: {msg['status']}\n{self.logs()}")

    def write_job(self, query: np.ndarray, gallery: np.ndarray, labels: np.ndarray,
                  rng: np.random.Generator) -> list[Path]:
        """Encode + share a plaintext query/gallery; write one .npz per party; returns the paths."""
        q0, q1 = split(encode_trunc(query), rng)
        g0, g1 = split(encode_trunc(gallery.reshape(-1, query.shape[-1])), rng)
        paths = []
        for rank, (q, g) in enumerate(((q0, g0), (q1, g1))):
            path = self.dir / f"job-{uuid.uuid4().hex}-{rank}.npz"
            np.savez(path, query_share=q, gallery_share=g, labels=np.asarray(labels, dtype=np.int64))
            paths.append(path)
        return paths

    def submit_async(self, rank: int, job_id: str, kind: str, npz: Path, threshold: float,
                     timeout: float = 60, gallery_id: str | None = None) -> Replies:
        return self.party(rank).send({"cmd": "submit", "job_id": job_id, "kind": kind,
                                        "npz": str(npz), "threshold": threshold, "timeout": timeout,
                                        "gallery_id": gallery_id})

    @staticmethod
    def result(q: Replies, timeout: float = 120) -> dict[str, Any]:
        while True:
            msg = q.get(timeout=timeout)
            if "share" in msg or "error" in msg:
                return msg

    def run(self, kind: str, query: np.ndarray, gallery: np.ndarray, labels: np.ndarray, threshold: float,
            rng: np.random.Generator, timeout: float = 60) -> tuple[int | list[int], float]:
        """Run one job at both parties on a freshly shared gallery; returns (output, party-0 seconds)."""
        shares = split(encode_trunc(gallery.reshape(-1, query.shape[-1])), rng)
        out, elapsed, self.last_stats = self.run_shared(kind, query, shares, labels, threshold, rng, timeout)
        return out, elapsed

    def run_shared(self, kind: str, query: np.ndarray, gallery_shares: tuple[np.ndarray, np.ndarray],
                   labels: np.ndarray, threshold: float, rng: np.random.Generator,
                   timeout: float = 60, gallery_id: str | None = None) -> tuple[int | list[int], float, list[Any]]:
        """One job with the given (fixed) gallery shares and fresh query shares, so the parties' fixed-gallery
        mask cache can hit across jobs. ``query`` is [d] or a batch [Q, d] (then a list of outputs).
        ``gallery_id``: as the party server does, name the snapshot so an unchanged one is not compared."""
        return self.run_shared_many(kind, [query], gallery_shares, labels, threshold, rng, timeout, gallery_id)[0]

    def run_shared_many(self, kind: str, queries: list[np.ndarray], gallery_shares: tuple[np.ndarray, np.ndarray],
                        labels: np.ndarray, threshold: float, rng: np.random.Generator, timeout: float = 60,
                        gallery_id: str | None = None) -> list[tuple[int | list[int], float, list[Any]]]:
        """Like ``run_shared`` for several jobs submitted at once (concurrent requests, in this order at both
        parties); returns (output, party-0 seconds, stats) per job."""
        return self.run_jobs([(kind, q, gallery_shares, labels, gallery_id) for q in queries], threshold, rng, timeout)

    def run_jobs(self, jobs: list[tuple[str, np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray, str | None]],
                 threshold: float, rng: np.random.Generator,
                 timeout: float = 60) -> list[tuple[int | list[int], float, list[Any]]]:
        """Jobs (kind, query, gallery shares, labels, gallery id), each on its own gallery, submitted at once in this
        order at both parties (fresh query shares); returns (output, party-0 seconds, stats) per job."""
        written = []
        for kind, query, gallery_shares, labels, gallery_id in jobs:
            q0, q1 = split(encode_trunc(query), rng)
            paths = []
            for rank, (q, g) in enumerate(((q0, gallery_shares[0]), (q1, gallery_shares[1]))):
                path = self.dir / f"job-{uuid.uuid4().hex}-{rank}.npz"
                np.savez(path, query_share=q, gallery_share=g, labels=np.asarray(labels, dtype=np.int64))
                paths.append(path)
            written.append((uuid.uuid4().hex, kind, paths, gallery_id))
        loads = [self.party(r).send({"cmd": "load", "npz": str(paths[r])})
                 for _, _, paths, _ in written for r in (0, 1)]
        for replies in loads:  # both parties hold the arrays before either timer starts
            replies.get(timeout=timeout + 60)
        pending = [[self.submit_async(r, job_id, kind, paths[r], threshold, timeout, gallery_id) for r in (0, 1)]
                   for job_id, kind, paths, gallery_id in written]
        out = []
        for (_, _, paths, _), qs in zip(written, pending):
            res = [self.result(q, timeout + 60) for q in qs]
            for p in paths:
                p.unlink(missing_ok=True)
            for r, msg in enumerate(res):
                if "error" in msg:
                    raise RuntimeError(f"party {r}: {msg['error']}")
            s0, s1 = res[0]["share"], res[1]["share"]
            value = [reconstruct(a, b) for a, b in zip(s0, s1)] if isinstance(s0, list) else reconstruct(s0, s1)
            out.append((value, float(res[0]["elapsed"]), [m.get("stats") for m in res]))
        return out

    def logs(self) -> str:
        out = []
        for name in ("dealer.log", "party0.log", "party1.log"):
            path = self.dir / name
            if path.exists():
                text = path.read_bytes().decode(errors="replace")
                lines = [ln[:300] for ln in text.splitlines() if "privface" in ln or "Error" in ln]
                out.append(f"--- {name}\n" + "\n".join(lines[-15:]))
        return "\n".join(out)

    def close(self) -> None:
        for proc in (*self.parties, self.dealer):
            if proc is not None:
                proc.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:  # the processes' last lines beside the failure (pytest shows what was printed)
            print(self.logs())
        self.close()
