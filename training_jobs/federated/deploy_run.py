"""Drive one federated job in Flower's deployment runtime: real devices (SuperNodes) behind a SuperLink.

    .venv-federated/bin/python -m training_jobs.federated.deploy_run --superlink HOST:PORT --insecure \
        --rounds 1 --min-nodes 2 --per-round 2 --state-dir var/federated/job_x --progress \
        --baseline-dir var/models/v0 --export-dir var/models --version fed-x

The gateway's `federated` job with `engine: deployment` starts this instead of `simulate` (same progress lines,
same result line, same publish path). It submits the project's Flower App (flower_app/) to the SuperLink the
operator configured (`flwr run`, a FLWR_HOME of its own in the state directory), with the job's options as the
app's run config; follows the run through the ServerApp's round state, which the ServerApp writes after every
round into the job's state directory (so the SuperLink must see that directory at the same path: same host or a
shared mount); stops the run with `flwr stop` once the job is cancelled; and at the end loads the final global
parameters, measures held-out metrics on LFW View-2 folds 6-10 pairs (never a device's photos) before and after
and for the active version, and exports the candidate exactly as `simulate` does.

A worker that dies mid-run leaves the run on the SuperLink; the next attempt of the job finds the run id in the
state directory (run.json, or the owner file the run's ServerApp wrote) and follows the same run instead of
submitting another. If it died before either existed, the next attempt submits again, and whichever run's ServerApp
starts first owns the directory; the other refuses it before any round (checkpoint.claim), and the job follows the
owner, so the devices are trained once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from inference.lfw import lfw_dir, shared_dir
from inference.metadata import ModelMetadata
from inference.transform import PRESETS
from training_jobs.federated import checkpoint
from training_jobs.federated.deploy import settings_from_run_config
from training_jobs.federated.heldout import Heldout
from training_jobs.federated.params import set_arrays
from training_jobs.federated.server_app import base_model
from training_jobs.federated.settings import AGGREGATIONS, ServerSettings
from training_jobs.federated.simulate import (PARENT_ENV, add_calibration_argument, baseline_metrics,
                                              die_with_parent, export_candidate, print_event, progress_printer)

APP = Path(__file__).resolve().parent / "flower_app"
CONNECTION = "job"  # the one SuperLink connection in the run's own FLWR_HOME
RUN_FILE, REPORT_FILE = "run.json", "report.json"
STATUS_EVERY_S = 30.0  # how often the run's status is asked of the SuperLink (each `flwr ls` is a process)


class DeploymentError(RuntimeError):
    """The run could not be submitted, or ended without finishing its rounds: one line for the job's message."""


def flwr_home(state_dir: Path, superlink: str, root_certificates: Path | None, insecure: bool) -> Path:
    """A FLWR_HOME with one connection, to the operator's SuperLink (TLS with its root certificate, or plain
    text only when the operator said --insecure)."""
    home = state_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true" if insecure else (f"root-certificates = {json.dumps(str(root_certificates))}"
                                              if root_certificates else "")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f"address = {json.dumps(superlink)}\n{tls}\n")
    return home


def flwr(home: Path, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """One `flwr` CLI command with JSON output; a DeploymentError naming the command's last line if it fails."""
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"flwr {args[0]}: no answer from the SuperLink within {timeout:g} s") from None
    try:
        out: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out = {}
    if proc.returncode != 0 or not out.get("success"):
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        reason = out.get("error-message") or (lines[-1] if lines else f"exit status {proc.returncode}")
        last = [line.strip() for line in str(reason).splitlines() if line.strip()] or ["no output"]
        raise DeploymentError(f"flwr {args[0]} failed: {last[-1][:300]}")
    return out


def run_config(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    """The Flower App's run config for this job (every key of flower_app/pyproject.toml, so nothing falls back
    to the app's defaults). Held-out evaluation runs here after the run, not on the SuperLink."""
    return {"num-rounds": args.rounds, "min-nodes": args.min_nodes, "clients-per-round": args.per_round,
            "scope": args.scope, "aggregation": args.aggregation, "seed": args.seed, "transform": args.transform,
            "epsilon": args.epsilon, "local-epochs": args.epochs, "batch-size": 4, "max-weight": args.max_images,
            "round-timeout": args.round_timeout, "heldout-pairs-per-fold": 0, "state-dir": str(state_dir),
            "report": str(state_dir / REPORT_FILE)}


def toml_overrides(config: dict[str, Any]) -> str:
    """`k=v ...` for `flwr run --run-config` (JSON strings and numbers are valid TOML values)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())


def record_run(state_dir: Path, run_id: int) -> None:
    """run.json: the run this job follows, so a later attempt follows it again instead of submitting another."""
    (state_dir / RUN_FILE).write_text(json.dumps({"run-id": int(run_id)}))


def submit_or_resume(home: Path, state_dir: Path, config: dict[str, Any]) -> tuple[int, bool]:
    """The run id of this job and whether a previous attempt submitted it (then it is followed again, never
    submitted twice: two runs would train the same devices into the same state directory). The run that claimed
    the directory (checkpoint.claim, by its ServerApp) wins over run.json: an attempt killed between `flwr run`
    and writing run.json left no run.json, but its run's ServerApp left its id."""
    known = checkpoint.owner(state_dir)
    if known is None and (state_dir / RUN_FILE).exists():
        known = int(json.loads((state_dir / RUN_FILE).read_text())["run-id"])
    if known is not None:
        record_run(state_dir, known)
        return known, True
    run_id = int(flwr(home, "run", str(APP), CONNECTION, "--run-config", toml_overrides(config))["run-id"])
    record_run(state_dir, run_id)
    return run_id, False


def take_over(state_dir: Path, run_id: int) -> int:
    """The run to follow: the directory's owner when another run claimed it first. That happens when an attempt
    died after `flwr run` but before run.json, and its run started only after the next attempt submitted again;
    the later ServerApp refuses the directory (checkpoint.StateDirTaken) and fails without training."""
    holder = checkpoint.owner(state_dir)
    if holder is None or holder == run_id:
        return run_id
    record_run(state_dir, holder)
    print_event("submitted", run_id=holder, resumed=True, duplicate_run=run_id)
    return holder


def run_status(home: Path, run_id: int) -> str:
    """The run's status on the SuperLink: pending, starting, running, finished:completed|failed|stopped."""
    runs = flwr(home, "ls", CONNECTION, "--run-id", str(run_id), timeout=60).get("runs") or [{}]
    return str(runs[0].get("status", "unknown"))


def stop(home: Path, run_id: int) -> bool:
    """`flwr stop` of the run, at once (not after the round in progress); a run that has already ended is fine."""
    try:
        flwr(home, "stop", str(run_id), CONNECTION, timeout=60)
    except DeploymentError:
        if not run_status(home, run_id).startswith("finished"):
            raise
    return True


def follow(home: Path, run_id: int, state_dir: Path, rounds: int, poll_s: float = 2.0) -> tuple[str, int]:
    """Print one `round` event per round the ServerApp saved, stop the run when the job is cancelled; returns
    the run's end, `finished` or `cancelled` (a DeploymentError when it failed or was stopped by someone else),
    and the run that owned the state directory."""
    on_round, shown, stamp, asked, stopping = progress_printer(rounds), 0, -1, 0.0, False
    report = state_dir / REPORT_FILE
    while True:
        run_id = take_over(state_dir, run_id)
        done = json.loads(report.read_text()) if report.exists() else {}
        state_file = checkpoint.state_path(state_dir)
        if state_file.exists() and (state_file.stat().st_mtime_ns != stamp or done):
            stamp = state_file.stat().st_mtime_ns
            state = checkpoint.load(state_dir)
            for entry in (state.log["rounds"] if state else [])[shown:]:
                on_round(entry["round"], entry, None)
                shown += 1
        if checkpoint.cancel_path(state_dir).exists() and not stopping:
            stopping = stop(home, run_id)
        if done.get("status") in ("finished", "cancelled"):
            return str(done["status"]), run_id
        if "status" in done and stopping:  # a stopped ServerApp may write `failed: ...` as it is torn down
            return "cancelled", run_id
        if "status" in done:
            raise DeploymentError(f"the ServerApp stopped: {done['status']}"[:300])
        if stopping or time.monotonic() - asked > STATUS_EVERY_S:
            asked, status = time.monotonic(), run_status(home, run_id)
            if status.startswith("finished") and stopping:
                return "cancelled", run_id
            if status.startswith("finished") and not report.exists():
                time.sleep(poll_s)  # the report is written just before the ServerApp exits: one more look
                if not report.exists():
                    raise DeploymentError(f"run {run_id} ended {status} without a report in {state_dir} (does the "
                                          "SuperLink's ServerApp see this directory? see the SuperLink's log)")
        time.sleep(poll_s)


def publish(args: argparse.Namespace, settings: ServerSettings, state: checkpoint.RoundState,
            started: float) -> dict[str, Any]:
    """Held-out metrics before/after (and of the active version) and the exported candidate: `simulate`'s path."""
    publishing = time.perf_counter()
    spec = PRESETS[args.transform](args.epsilon)
    shared = shared_dir()
    heldout = Heldout(lfw_dir(shared), spec, args.pairs_per_fold, seed=args.seed)
    model = base_model(settings)
    before = heldout.evaluate(model, "round 0 (the devices' published model)")
    set_arrays(model, state.arrays)
    after = heldout.evaluate(model, f"round {state.round}")
    baseline = baseline_metrics(args.baseline_dir, heldout, args.state_dir) if args.baseline_dir else None
    log = {**state.log, "heldout": {"0": before, str(state.round): after}, "status": "finished",
           "last_round": state.round, "final_arrays": state.arrays, "engine": "deployment",
           "settings": {**settings.identity(), "transform": spec.transform_id}}
    report = {key: value for key, value in log.items() if key != "final_arrays"}
    report["baseline"], report["base"], report["dp"] = baseline, "v0", None
    if args.export_dir is not None:
        metrics = {"federated": {"heldout": log["heldout"], "baseline": baseline, "settings": report["settings"],
                                 "engine": "deployment", "devices": sorted({c for r in state.log["rounds"]
                                                                            for c in r.get("replied_clients", [])})}}
        report["exported"] = str(export_candidate(log, settings, args.export_dir, args.version, metrics,
                                                  args.calibration_images, args.calibration_faces))
    report["publish_seconds"] = time.perf_counter() - publishing  # held-out x3 + export (ONNX, calibration)
    report["wall_seconds"] = time.perf_counter() - started
    return report


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's Control API")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="PEM file of the CA that signed the SuperLink's cert")
    tls.add_argument("--insecure", action="store_true", help="plain text (a SuperLink on loopback only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-nodes", type=int, default=2, help="the first round waits for this many devices")
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--scope", default="whole", choices=("whole", "adapter-tail"))
    parser.add_argument("--aggregation", default="fedavg", choices=AGGREGATIONS)
    parser.add_argument("--seed", type=int, default=0, help="server-side sampling only (devices draw from the OS)")
    parser.add_argument("--transform", default="dct8-v0", choices=sorted(PRESETS))
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-images", type=int, default=4, help="a device's FedAvg weight is capped at this")
    parser.add_argument("--round-timeout", type=float, default=600.0)
    parser.add_argument("--pairs-per-fold", type=int, default=60, help="held-out pairs per LFW fold 6-10")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--baseline-dir", type=Path, default=None, help="the active version (the guardrail's)")
    parser.add_argument("--export-dir", type=Path, default=None)
    parser.add_argument("--version", default=None)
    add_calibration_argument(parser)
    parser.add_argument("--progress", action="store_true", help="JSON lines for the driving job")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if os.environ.get(PARENT_ENV):
        die_with_parent(int(os.environ[PARENT_ENV]))
    started = time.perf_counter()
    state_dir = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if args.baseline_dir and ModelMetadata.load(args.baseline_dir, verify=False).spec != PRESETS[args.transform](
            args.epsilon):
        raise SystemExit(f"error: the active version serves another transform than {args.transform} at "
                         f"epsilon {args.epsilon:g}, which the devices train on")
    config = run_config(args, state_dir)
    settings = settings_from_run_config(config, shared_dir())  # bad values refused before anything is sent
    home = flwr_home(state_dir, args.superlink, args.root_certificates, args.insecure)
    if (checkpoint.cancel_path(state_dir).exists() and not (state_dir / RUN_FILE).exists()
            and checkpoint.owner(state_dir) is None):
        print_event("result", status="cancelled", last_round=0, run_id=None)  # cancelled before it was sent
        return
    try:
        run_id, resumed = submit_or_resume(home, state_dir, config)
        saved = checkpoint.load(state_dir) if resumed else None
        print_event("submitted", run_id=run_id, resumed=resumed)
        end, run_id = follow(home, run_id, state_dir, args.rounds)
    except DeploymentError as error:
        raise SystemExit(f"DeploymentError: {error}") from None
    state = checkpoint.load(state_dir)
    if end == "cancelled" or state is None or state.round < args.rounds:
        print_event("result", status="cancelled", last_round=state.round if state else 0, run_id=run_id)
        return
    report = {**publish(args, settings, state, started), "run_id": run_id}
    if resumed:  # the job's `resumed` list, as simulate's: where this attempt took the run over
        report["resumed"] = [*report.get("resumed", []), {"from_round": saved.round if saved else 0,
                                                          "run_id": run_id}]
    if args.progress:
        print_event("result", **report)
    else:
        print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
