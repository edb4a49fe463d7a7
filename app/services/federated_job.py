"""The `federated` job: run federated retraining in `.venv-federated`, follow it, publish the candidate.

Why a subprocess: Flower pins web-framework versions the gateway does not run (docs/federated.md), so the
gateway's environment has no flwr. The job starts `training_jobs.federated.simulate` under
`PRIVFACE_FEDERATED_PYTHON`, reads its one-JSON-line-per-round progress into the job row, and when the run has
exported the candidate into the model directory, registers it and applies the publishing guardrail: activate
only if its held-out accuracy is not worse than the active version's (same pairs, same noise draws) by more than
`PRIVFACE_FEDERATED_TOLERANCE`.

Lifecycle (app/services/jobs.py): the run saves its state after every round under
`PRIVFACE_FEDERATED_STATE_DIR/<job id>`; a cancel request makes the job create `cancel` there and the run stops
after the round in progress (the job ends `cancelled`, no candidate); when the worker dies mid-job, the run dies
with it (it watches its parent) and the requeued job starts the same command, which resumes after the last
saved round. The state directory is removed once the job has ended, whatever the outcome.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.problems import Problem
from app.services.federated_deploy import deployment_command
from app.settings import GatewaySettings
from common.paths import PROJECT_ROOT

if TYPE_CHECKING:  # app/services/jobs.py imports this module
    from app.services.jobs import JobReporter

STDERR_TAIL_BYTES = 64 * 1024
SECAGG_MAX_CLIENTS = 2**32 // 2**22 - 1  # modulus / quantisation range of training_jobs.federated.secagg
PARENT_ENV = "PRIVFACE_FEDERATED_PARENT"  # training_jobs.federated.simulate dies when this pid is no longer its parent
# name -> (default, meaning), for the README's configuration table (scripts/config_table.py)
VARIABLES = {PARENT_ENV: ("", "Internal, set by the gateway's job runner: the federated simulation exits when this "
                              "pid is no longer its parent (a killed worker leaves no orphan run).")}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class MixupParams(BaseModel):
    """Training-time MixUp on the devices (training_jobs/federated/mixup.py): each sample mixes k photos."""

    model_config = ConfigDict(extra="forbid", strict=True)
    k: int = Field(ge=2, le=8, description="photos per mix (capped by the photos a device has)")
    adaptive: bool = Field(False, description="weights from the adversarial strategy network, else Dirichlet")


class DpParams(BaseModel):
    """Client-side clipping + server-side Gaussian noise (training_jobs/federated/dp.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    clip: float = Field(gt=0, le=100, description="L2 bound of one client's update per round")
    noise_multiplier: float = Field(ge=0, le=100, description="noise std on the sum of updates / clip (0: clip only)")
    delta: float = Field(1e-5, gt=0, lt=0.1, description="the delta at which epsilon is reported")


class FederatedParams(BaseModel):
    """What an admin may set for one federated job (strict: unknown fields and wrong types are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rounds: int = Field(3, ge=1, le=50)
    clients: int = Field(30, ge=2, le=2000, description="simulated devices (training identities, one each)")
    clients_per_round: int = Field(10, ge=1, le=2000)
    scope: Literal["whole", "adapter-tail"] = "whole"
    mode: Literal["supervised", "unsupervised"] = Field(
        "supervised", description="unsupervised: no labels on the devices (agreement of two views + distillation "
                                  "to the round's global model); identities with one photo take part")
    negatives: Literal["none", "gan"] = Field(
        "none", description="gan: devices push away from generated impostor features (federated/impostors.py)")
    aggregation: Literal["fedavg", "secagg+"] = Field(
        "fedavg", description="secagg+: Flower's SecAgg+, the server sees only the sum of the clients' updates")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    pairs_per_fold: int = Field(60, ge=2, le=300, description="held-out pairs per LFW fold 6-10")
    max_images: int = Field(4, ge=2, le=50, description="photos per device at most")
    epochs: int = Field(1, ge=1, le=10, description="local epochs per round")
    heldout_every_round: bool = False
    lr: float | None = Field(None, gt=0, le=0.01, description="the devices' learning rate (the adapter's is a fifth); "
                             "default 5e-4, which a strong base loses accuracy to (docs/federated.md)")
    mixup: MixupParams | None = Field(None, description="defence against update inversion; none = off")
    dp: DpParams | None = Field(None, description="differential privacy (fedavg only): (epsilon, delta) per round "
                                                  "in the progress and the result")
    engine: Literal["simulation", "deployment"] = Field(
        "simulation", description="deployment: real devices behind the operator's SuperLink "
                                  "(PRIVFACE_FEDERATED_SUPERLINK); `clients` = devices the first round waits for")
    base_version: str | None = Field(
        None, max_length=128, description="the model version to start from (it needs saved PyTorch weights); "
                                          "default: the active version of the admin's tenant's preset")

    @model_validator(mode="after")
    def _per_round_fits(self) -> "FederatedParams":
        if self.clients_per_round > self.clients:
            raise ValueError("clients_per_round must not exceed clients")
        if self.mixup is not None and self.mixup.k > self.max_images:
            raise ValueError(f"mixup.k ({self.mixup.k}) must not exceed max_images ({self.max_images})")
        if self.dp is not None and self.aggregation != "fedavg":
            raise ValueError("dp works with aggregation fedavg only")
        if self.engine == "deployment":
            check_deployment_options(self)
        if self.aggregation == "secagg+" and not 2 <= self.clients_per_round <= SECAGG_MAX_CLIENTS:
            raise ValueError(f"secagg+ needs 2 to {SECAGG_MAX_CLIENTS} clients_per_round (a sum of one client "
                             "hides nothing; more overflow the 32-bit modulus)")
        return self


def check_deployment_options(params: FederatedParams) -> None:
    """The deployment runtime's Flower App trains the supervised mode only, without impostors, MixUp, DP or an lr, and
    measures held-out metrics before and after only (deploy_run.py); anything else is refused, not ignored."""
    unsupported = [name for name, on in (("mode unsupervised", params.mode != "supervised"),
                                         ("negatives gan", params.negatives != "none"),
                                         ("mixup", params.mixup is not None), ("dp", params.dp is not None),
                                         ("heldout_every_round", params.heldout_every_round),
                                         ("lr", params.lr is not None)) if on]
    if unsupported:
        raise ValueError(f"engine deployment does not support {', '.join(unsupported)}")


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """The job's params with defaults filled in, or a 422 problem that names every bad field."""
    try:
        return FederatedParams.model_validate(params).model_dump()
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors())
        raise Problem(422, "invalid-job-params", "Invalid job parameters", f"federated: {errors}") from None


def resolve_base(settings: GatewaySettings, session: Session, params: dict[str, Any], preset: str) -> dict[str, Any]:
    """The params with `base_version` fixed to a concrete version (default: `preset`'s active one; none when
    the preset has no active version: the served v0), checked to have PyTorch weights the rounds can start
    from; a 422/409 problem otherwise (nothing is created). Fixed at creation so every attempt of the job (a
    resume) starts from the same model."""
    from app.models import ModelVersion
    from app.services.model_registry import active_version
    from inference.export import WeightsError, saved_weights

    name = params.get("base_version")
    row = session.get(ModelVersion, name) if name else active_version(session, preset)
    if row is None and name:
        raise Problem(422, "invalid-job-params", "Invalid job parameters",
                      f"federated: base_version: no model version {name!r}")
    if row is None:  # nothing active: the rounds start from the served v0 and the candidate is not activated
        return params
    try:
        saved_weights((settings.model_dir / row.path).parent)
    except (WeightsError, OSError, ValueError) as exc:
        raise Problem(409, "base-model-not-trainable", "The base model cannot be trained",
                      f"federated: base_version {row.version}: {exc}; start from a version exported with its "
                      "weights (a federated candidate, a training_jobs.train export, a bundled v1, or v0)") from None
    return {**params, "base_version": row.version}


class FederatedRunError(RuntimeError):
    """The federated subprocess failed; the message is one line (its exit status and last error line)."""


@dataclass
class Guardrail:
    """The publishing decision for a candidate and why."""

    activate: bool
    reason: str
    candidate_accuracy: float | None
    active_accuracy: float | None
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "activated" if self.activate else "kept-candidate", "reason": self.reason,
                "candidate_accuracy": self.candidate_accuracy, "active_accuracy": self.active_accuracy,
                "tolerance": self.tolerance}


def guardrail(candidate: float | None, active: float | None, tolerance: float) -> Guardrail:
    """Activate only when both accuracies are known and the candidate is not worse by more than `tolerance`."""
    if active is None:
        return Guardrail(False, "no active version to compare with", candidate, active, tolerance)
    if candidate is None:
        return Guardrail(False, "the candidate has no held-out accuracy", candidate, active, tolerance)
    if candidate < active - tolerance:
        return Guardrail(False, f"held-out accuracy {candidate:.4f} is below the active version's {active:.4f} "
                                f"by more than {tolerance:g}", candidate, active, tolerance)
    return Guardrail(True, f"held-out accuracy {candidate:.4f} vs active {active:.4f} (tolerance {tolerance:g})",
                     candidate, active, tolerance)


def command(settings: GatewaySettings, params: FederatedParams, version: str, baseline_dir: Path | None,
            state_dir: Path, base_dir: Path | None = None) -> list[str]:
    """The simulate command line for this job (the same for every attempt: a resumed run must match)."""
    cmd = [str(settings.federated_python), "-m", "training_jobs.federated.simulate",
           "--clients", str(params.clients), "--per-round", str(params.clients_per_round),
           "--rounds", str(params.rounds), "--scope", params.scope, "--seed", str(params.seed),
           "--pairs-per-fold", str(params.pairs_per_fold), "--max-images", str(params.max_images),
           "--epochs", str(params.epochs), "--aggregation", params.aggregation, "--progress",
           "--mode", params.mode, "--negatives", params.negatives,
           "--state-dir", str(state_dir), "--export-dir", str(settings.model_dir), "--version", version,
           "--calibration-images", str(settings.federated_calibration_images),
           *(["--calibration-faces", str(faces)] if (faces := settings.federated_calibration_faces) else [])]
    if params.heldout_every_round:
        cmd.append("--heldout-every-round")
    if params.lr is not None:
        cmd += ["--lr", repr(params.lr), "--adapter-lr", repr(params.lr / 5)]
    if params.mixup is not None:
        cmd += ["--mixup-k", str(params.mixup.k)] + (["--mixup-adaptive"] if params.mixup.adaptive else [])
    if baseline_dir is not None:
        cmd += ["--baseline-dir", str(baseline_dir)]
    if base_dir is not None:
        cmd += ["--base-dir", str(base_dir)]
    if params.dp is not None:
        cmd += ["--dp-clip", repr(params.dp.clip), "--dp-noise", repr(params.dp.noise_multiplier),
                "--dp-delta", repr(params.dp.delta)]
    return cmd


def subprocess_env(settings: GatewaySettings) -> dict[str, str]:
    """The run sees this checkout's code (PYTHONPATH first) and the gateway's shared data directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PRIVFACE_SHARED_DIR"] = str(settings.shared_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_ENV] = str(os.getpid())
    return env


def parse_event(line: str) -> dict[str, Any] | None:
    """A progress event of the simulate run, or None for any other output line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def last_error_line(stderr_tail: str) -> str:
    """The last non-empty line of the run's stderr (a Python traceback ends with its exception), one line."""
    lines = [ANSI.sub("", line).strip() for line in stderr_tail.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else "no error output"


def round_summary(event: dict[str, Any]) -> dict[str, Any]:
    """What the job row keeps of one round event."""
    keep = ("round", "of", "sampled", "finished", "failed", "train_seconds", "metrics", "heldout", "aggregation",
            "dp")
    return {key: event.get(key) for key in keep}


def submitted_message(event: dict[str, Any], devices: int) -> str:
    """The job's line once its run is on the SuperLink (engine deployment)."""
    run = event.get("run_id")
    if event.get("duplicate_run") is not None:
        return f"run {run} owns the job's state; run {event['duplicate_run']} submitted again refused it"
    if event.get("resumed"):
        return f"run {run} on the SuperLink followed again (not resubmitted)"
    return f"run {run} submitted to the SuperLink; waiting for {devices} devices"


def round_message(event: dict[str, Any]) -> str:
    if event["round"] == 0:
        return f"round 0 of {event['of']}: held-out evaluation of the starting model"
    if event.get("replayed"):
        return f"round {event['round']} of {event['of']} (saved before a restart; resuming after it)"
    loss = (event.get("metrics") or {}).get("loss")
    text = (f"round {event['round']} of {event['of']}: {event['finished']}/{event['sampled']} clients finished, "
            f"{event['failed']} failed")
    text += f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    epsilon = (event.get("dp") or {}).get("epsilon")
    return text + (f", (ε {epsilon:.3g}, δ {event['dp']['delta']:g})" if isinstance(epsilon, (int, float)) else "")


def run_simulation(cmd: list[str], env: dict[str, str], on_event: Callable[[dict[str, Any]], None], cancel_file: Path | None = None,
                   cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run the simulate subprocess in its own process group, feeding each event to `on_event`; returns the
    `result` event. Once `cancel` is set, `cancel_file` is created (the run stops after its round in progress).
    The group is killed if we stop following it for any reason."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)
        done = threading.Event()
        if cancel is not None and cancel_file is not None:
            threading.Thread(target=_forward_cancel, args=(cancel, done, cancel_file), daemon=True).start()
        result = None
        try:
            assert proc.stdout is not None  # stdout=PIPE above
            for line in proc.stdout:
                event = parse_event(line)
                if event is None:
                    continue
                if event["event"] == "result":
                    result = event
                else:
                    on_event(event)
            status = proc.wait()
        finally:
            done.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if status != 0 or result is None:
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
            tail = stderr.read().decode(errors="replace")
            raise FederatedRunError(f"federated run exited with status {status}: {last_error_line(tail)}")
        return result


def _forward_cancel(cancel: threading.Event, done: threading.Event, cancel_file: Path) -> None:
    while not done.is_set():
        if cancel.wait(0.5):
            cancel_file.parent.mkdir(parents=True, exist_ok=True)
            cancel_file.touch()
            return


def run_federated_job(settings: GatewaySettings, sessions: sessionmaker[Session], params: dict[str, Any],
                      report: JobReporter) -> dict[str, Any]:
    """The `federated` job kind: train (resuming a saved state), export, register, apply the guardrail."""
    from app.models import ModelVersion
    from app.services.jobs import JobCancelled
    from app.services.model_events import publish_activation
    from app.services.model_registry import activate_version, active_version, register_model_dir

    job = FederatedParams.model_validate(params)
    if not Path(settings.federated_python).exists():
        raise FederatedRunError(f"no federated environment at {settings.federated_python}: run "
                                "scripts/install_federated.sh or set PRIVFACE_FEDERATED_PYTHON")
    state_dir = settings.federated_state_dir / report.job_id
    with session_scope(sessions) as session:
        # the base (fixed when the job was created; none: the served v0, dct8-v0 = the accurate preset) and the
        # active version of its preset, which the guardrail compares the candidate with
        base = session.get(ModelVersion, job.base_version) if job.base_version else None
        base_dir = (settings.model_dir / base.path).parent if base is not None else None
        active = active_version(session, base.preset if base is not None else "accurate")
        active_name = active.version if active is not None else None
        baseline_dir = (settings.model_dir / active.path).parent if active is not None else None
    version = "fed-" + report.job_id.removeprefix("job_")[:16]
    rounds: list[dict[str, Any]] = []
    resuming = report.attempt > 1

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "submitted":  # engine deployment: the run is on the SuperLink, waiting for devices
            report.progress(0.02, submitted_message(event, job.clients), {"rounds": rounds, "run_id": event.get("run_id")})
        if event.get("event") != "round":
            return
        rounds[:] = [r for r in rounds if r["round"] < event["round"]] + [round_summary(event)]
        fraction = 0.05 + 0.8 * event["round"] / max(1, event["of"])
        report.progress(fraction, round_message(event), {"rounds": rounds})

    report.progress(0.01, f"resuming the federated run (attempt {report.attempt})" if resuming
                    else "starting the federated run")
    try:
        cmd = (deployment_command(settings, job, version, baseline_dir, state_dir) if job.engine == "deployment"
               else command(settings, job, version, baseline_dir, state_dir, base_dir))
        result = run_simulation(cmd,
                                subprocess_env(settings),
                                on_event, checkpoint_cancel(state_dir),
                                report.cancel_requested)
        if result.get("status") == "cancelled":
            last = result.get("last_round", 0)
            raise JobCancelled(f"cancelled after round {last} of {job.rounds}", {"rounds": rounds, "last_round": last})
        report.progress(0.9, "registering the candidate", {"rounds": rounds})
        if report.cancel_requested.is_set():  # asked to stop during the last round: the candidate is not published
            raise JobCancelled(f"cancelled after round {job.rounds} of {job.rounds}, before the candidate was "
                               "registered", {"rounds": rounds, "last_round": job.rounds})
        heldout = result.get("heldout") or {}
        final = heldout.get(str(job.rounds)) or {}
        baseline = result.get("baseline") or {}
        decision = guardrail(final.get("accuracy"), baseline.get("accuracy") if active_name else None,
                             settings.federated_tolerance)
        with session_scope(sessions) as session:
            row = register_model_dir(session, settings.model_dir, Path(result["exported"]))
            if decision.activate:
                row = activate_version(session, row.version)
            out = {"version": row.version, "status": row.status, "sha256": row.sha256}
        if decision.activate:
            publish_activation(settings.redis_url, version)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)  # reached only while this process lives: a kill keeps it
    return {**out, "guardrail": decision.to_dict(), "active_before": active_name, "aggregation": job.aggregation,
            "base_version": base.version if base is not None else None, "dp": result.get("dp"),
            "engine": job.engine, "run_id": result.get("run_id"), "publish_seconds": result.get("publish_seconds"),
            "heldout": {"before": heldout.get("0"), "after": final, "active_version": baseline or None},
            "rounds": rounds, "resumed": result.get("resumed", []), "attempts": report.attempt,
            "seconds": result.get("wall_seconds")}


def checkpoint_cancel(state_dir: Path) -> Path:
    """The file the run looks for between rounds (training_jobs.federated.checkpoint.CANCEL_FILE)."""
    return state_dir / "cancel"
