"""The operator's switch to the int8 model, run for real on a local stack (docs/operations.md, "int8: ...").

1. Starts the real local stack (dealer, two parties, gateway; fresh SQLite databases) serving the bundled float
   models, tenant preset accurate.
2. Enrolls the first photo of N genuine and N impostor pairs of LFW View-2 folds 6-10 (evaluation only: nothing
   here is calibrated or tuned) as one subject each under the float model and verifies the second photo.
3. Copies the int8 directory (`python -m inference.quantize --model inference/bundled/v1-accurate
   --out var/int8/v1-accurate-int8`) into the model directory, registers it (`POST /v1/admin/jobs`, kind
   `register-model`), activates it (`POST /v1/admin/models/{version}/activate`) and waits until /readyz says
   the gateway serves it.
4. Verifies the same pairs again (templates still under the float model), then re-enrolls each first photo
   under the int8 model and verifies once more.

Per phase: genuine pairs accepted, impostor pairs refused, the model versions that answered.

    python -m bench.int8_switch --int8 var/int8/v1-accurate-int8 [--pairs 10] [--out docs/results/int8_switch.json]
"""
from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from common.paths import PROJECT_ROOT
from devtools.localstack import NO_ABUSE_LIMITS, LocalStack
from inference.lfw import lfw_dir, load_rgb, read_pairs
from inference.metadata import ModelMetadata
from inference.transform import TransformSpec
from tests.test_gateway_api import auth, payload
from bench.report import emit

BUNDLED = PROJECT_ROOT / "inference" / "bundled"
HELDOUT_FOLDS = range(6, 11)


def bundled_stack(workdir: Path) -> LocalStack:
    """A stack (not started) serving the bundled float models, preset accurate, without abuse budgets."""
    return LocalStack(workdir, model_dir=workdir / "models", extra_env={
        "PRIVFACE_BUNDLED_MODEL_DIR": str(BUNDLED), "PRIVFACE_DEFAULT_PRESET": "accurate", **NO_ABUSE_LIMITS})


def wait_job(stack: LocalStack, key: str, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=auth(key), timeout=60).json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def switch_to(stack: LocalStack, key: str, version_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The operator path: copy `version_dir` into the model directory under its version's name, register it
    (admin job), activate it, wait until the gateway serves it for the accurate preset. Returns what each
    step answered, with its seconds."""
    version = ModelMetadata.load(version_dir, verify=True).version
    shutil.copytree(version_dir, stack.model_dir / version)
    started = time.monotonic()
    created = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "register-model", "params": {"path": version}},
                         headers=auth(key), timeout=60)
    job = wait_job(stack, key, created.json()["id"])
    registered = time.monotonic()
    activated = httpx.post(f"{stack.url}/v1/admin/models/{version}/activate", headers=auth(key), timeout=60)
    while served_version(stack) != version and time.monotonic() < registered + timeout:
        time.sleep(0.2)
    return {"job": job, "activate_status": activated.status_code, "activated": activated.json(),
            "served": served_version(stack), "register_s": round(registered - started, 2),
            "activate_to_served_s": round(time.monotonic() - registered, 2)}


def served_version(stack: LocalStack) -> str | None:
    """The version the gateway serves for the accurate preset (/readyz)."""
    ready: dict[str, Any] = httpx.get(stack.url + "/readyz", timeout=60).json()
    served: str | None = ready["checks"]["model"]["presets"].get("accurate")
    return served


def served_spec(stack: LocalStack, key: str) -> TransformSpec:
    advertised = httpx.get(stack.url + "/v1/transforms", headers=auth(key), timeout=60).json()
    return TransformSpec.from_dict(advertised[0]["spec"])


def enroll(stack: LocalStack, key: str, spec: TransformSpec, face: Any, subject: str | None = None) -> dict[str, Any]:
    """Enroll `face` as a new subject (or as another template of `subject`); returns the enrollment."""
    if subject is None:
        subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key), timeout=60).json()["id"]
    response = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": payload(spec, face)},
                          headers=auth(key), timeout=120)
    response.raise_for_status()
    enrollment: dict[str, Any] = response.json()
    return enrollment


def verify(stack: LocalStack, key: str, spec: TransformSpec, subject: str, face: Any) -> dict[str, Any]:
    response = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, face)},
                          headers=auth(key), timeout=120)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def heldout_pairs(count: int) -> list[tuple[str, str, bool]]:
    """`count` genuine and `count` impostor pairs spread over View-2 folds 6-10 (evaluation only)."""
    pairs = [p for p in read_pairs(lfw_dir()) if p.fold in HELDOUT_FOLDS]
    chosen = []
    for same in (True, False):
        kind = [p for p in pairs if p.same == same]
        step = max(1, len(kind) // count)
        chosen += [(p.left, p.right, p.same) for p in kind[::step][:count]]
    return chosen


def verify_phase(stack: LocalStack, key: str, spec: TransformSpec, subjects: list[str],
                 pairs: list[tuple[str, str, bool]]) -> dict[str, Any]:
    """Verify every pair's second photo against its subject: decisions and the versions that answered."""
    lfw = lfw_dir()
    answers = [verify(stack, key, spec, subject, load_rgb(lfw, right)) for subject, (_, right, _) in zip(subjects, pairs)]
    genuine = [a["match"] for a, p in zip(answers, pairs) if p[2]]
    impostor = [a["match"] for a, p in zip(answers, pairs) if not p[2]]
    return {"genuine_accepted": f"{sum(genuine)}/{len(genuine)}",
            "impostor_refused": f"{len(impostor) - sum(impostor)}/{len(impostor)}",
            "answered_by": dict(Counter(a["model_version"] for a in answers)),
            "wrong": [f"{left} vs {right}" for a, (left, right, same) in zip(answers, pairs) if a["match"] != same]}


def run(workdir: Path, int8_dir: Path, count: int) -> dict[str, Any]:
    stack = bundled_stack(workdir).start()
    try:
        key = stack.api_key("enroll", "verify", "admin")
        spec, lfw, pairs = served_spec(stack, key), lfw_dir(), heldout_pairs(count)
        subjects = [enroll(stack, key, spec, load_rgb(lfw, left))["subject_id"] for left, _, _ in pairs]
        report: dict[str, Any] = {"pairs": "LFW View-2 folds 6-10, first photo enrolled, second verified",
                                  "float": verify_phase(stack, key, spec, subjects, pairs)}
        report["switch"] = switch_to(stack, key, int8_dir)
        report["after_switch"] = verify_phase(stack, key, spec, subjects, pairs)
        versions = {enroll(stack, key, spec, load_rgb(lfw, left), subject)["model_version"]
                    for subject, (left, _, _) in zip(subjects, pairs)}
        report["reenrolled_under"] = sorted(versions)
        report["after_reenroll"] = verify_phase(stack, key, spec, subjects, pairs)
        report["models"] = {m["version"]: m["status"] for m in
                            httpx.get(stack.url + "/v1/admin/models", headers=auth(key), timeout=60).json()}
        report["gateway_log"] = [line for line in stack.log("gateway").splitlines() if "serving model version" in line]
        return report
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int8", type=Path, required=True, help="the directory inference.quantize made")
    parser.add_argument("--pairs", type=int, default=10, help="genuine pairs, and as many impostor pairs")
    parser.add_argument("--workdir", type=Path, default=Path("var/int8-switch"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)  # fresh databases and model directory every run
    report = run(args.workdir, args.int8, args.pairs)
    emit(report, args.out)


if __name__ == "__main__":
    main()
