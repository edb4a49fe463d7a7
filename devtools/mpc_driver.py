"""Test driver of the MPC engine: ``python -m devtools.mpc_driver party --rank R`` or ``... dealer``.

Settings come from the environment (PRIVFACE_MPC_*). The party driver starts an ``MpcEngine`` and serves
JSON lines on stdin (each handled in its own thread), answering JSON lines on stdout:
  {"cmd": "status", "tag": T}                                -> {"tag": T, "status": {...}}
  {"cmd": "wait", "timeout": S, "tag": T}                    -> {"tag": T, "connected": bool, "status": {...}}
  {"cmd": "load", "npz": PATH, "tag": T}                     -> {"tag": T, "loaded": true} (optional: read ahead)
  {"cmd": "submit", "tag": T, "job_id": J, "kind": K, "npz": PATH, "threshold": X, "timeout": S,
   "gallery_id": G (optional)}
        (PATH holds arrays query_share, gallery_share, labels) -> {"tag": T, "share": int, "elapsed": s}
                                                             or {"tag": T, "error": "...", "elapsed": s}
  {"cmd": "forget", "tag": T}                                -> {"tag": T, "forgotten": true} (after a delete)
  {"cmd": "exit"}
Production parties embed the engine in the party server instead (secure.party.server).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from typing import Any


def _party(rank: int) -> int:
    import numpy as np

    from secure.mpc.engine import MatchJob, MpcUnavailable
    from secure.mpc.settings import MpcSettings
    from secure.mpc.sharding import make_engine

    engine = make_engine(rank, MpcSettings())
    engine.start()
    out_lock = threading.Lock()
    loaded: dict[str, dict[str, Any]] = {}  # npz path -> arrays read by a "load" command, taken by its "submit"

    def say(obj: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def handle(req: dict[str, Any]) -> None:
        tag = req.get("tag")
        cmd = req.get("cmd")
        if cmd == "status":
            say({"tag": tag, "status": engine.status()})
        elif cmd == "wait":
            ok = engine.wait_connected(float(req.get("timeout", 60)))
            say({"tag": tag, "connected": ok, "status": engine.status()})
        elif cmd == "forget":  # what the party server does after a committed delete (erasure)
            engine.forget_rows()
            say({"tag": tag, "forgotten": True})
        elif cmd == "load":  # read a job's arrays ahead, so both parties' timers start with the data in memory
            with np.load(req["npz"]) as data:
                loaded[req["npz"]] = {k: data[k] for k in ("query_share", "gallery_share", "labels")}
            say({"tag": tag, "loaded": True})
        elif cmd == "submit":
            data = loaded.pop(req["npz"], None)
            if data is None:
                with np.load(req["npz"]) as npz:
                    data = {k: npz[k] for k in ("query_share", "gallery_share", "labels")}
            job = MatchJob(job_id=req["job_id"], kind=req["kind"], query_share=data["query_share"],
                           gallery_share=data["gallery_share"], labels=data["labels"],
                           threshold=float(req["threshold"]), gallery_id=req.get("gallery_id"))
            say({"tag": tag, "submitted": True})
            t0 = time.monotonic()
            try:
                share = engine.submit(job, float(req.get("timeout", 60)))
                say({"tag": tag, "share": share, "elapsed": time.monotonic() - t0,
                     "stats": engine.job_stats(req["job_id"])})
            except (MpcUnavailable, ValueError) as exc:  # ValueError: a job the engine refuses (e.g. threshold > 1)
                say({"tag": tag, "error": str(exc), "elapsed": time.monotonic() - t0})

    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            req = json.loads(line)
            if req.get("cmd") == "exit":
                break
            threading.Thread(target=handle, args=(req,), daemon=True).start()
    finally:
        engine.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.mpc_driver")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("party")
    p.add_argument("--rank", type=int, required=True, choices=(0, 1))
    sub.add_parser("dealer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.what == "party":
        return _party(args.rank)
    from secure.mpc.settings import MpcSettings
    from secure.mpc.sharding import run_dealers

    run_dealers(MpcSettings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
