"""Sealed enroll + verify (issue 12) in three real processes: only ciphertext reaches a party, only a bit leaves.

    python -m bench.sealed_verify --checkpoint var/training/cpu-sealed-quad/checkpoints/last.pt \
        --pairs-per-fold 4 --threshold 0.3 --out var/sealed/verify

Each party process makes its own X25519 key (``secure.sealed_box``; ``PRIVFACE_PARTY_SEALED_KEY`` when set) and
publishes the public half (here: a file, in the service: ``GET /v1/sealed/keys``). The parent plays the SDK and the
relay: it transforms each photo (noise from os.urandom), seals the two shares with ``client.sealed`` and hands the
envelopes to both parties; a party can open only its own. Enroll: the student under MPC -> unit embedding -> the
tenant's rotation (``inference.protect``; public to the parties in this driver) -> template shares kept by each
party. Verify: the same for the probe, <q, t> by a Beaver product, [score >= threshold] by CrypTen's comparison;
only that bit is opened. Held-out LFW View-2 folds 6-10 pairs: enroll the left image, verify the right one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.sealed_mpc import DEALER_ROLE, child_arguments, load_student, measured, twin_raw


def wait_for(path: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def party(role: int, work: Path, port: int) -> None:
    """A party: publish a key, open its envelopes, enroll then verify under MPC; party 0 writes the opened bits."""
    import torch

    torch.set_num_threads(1)
    from secure import sealed_box
    from secure.mpc.protocols.sealed_model import input_from_share, private_embedding, private_unit
    from secure.mpc.runtime.session import exit_now, init_crypten
    from secure.mpc.settings import MpcSettings

    key = sealed_box.party_key_from_env()
    (work / f"pub{role}.tmp").write_text(key.public_b64)
    (work / f"pub{role}.tmp").rename(work / f"pub{role}.txt")
    crypten = init_crypten(role, MpcSettings(master_port=port, torch_threads=1, op_timeout_s=300,
                                             connect_timeout_s=120))
    wait_for(work / "requests.json")
    plan = torch.load(work / "plan.pt", weights_only=False)
    requests = json.loads((work / "requests.json").read_text())
    rotation = torch.as_tensor(plan["rotation"], dtype=torch.float32)
    comm = crypten.communicator.get()

    def embed(batch: list[dict[str, Any]]) -> Any:
        shares = [sealed_box.open_share(r["envelopes"][role], role, key, r["context"]) for r in batch]
        x = input_from_share(crypten, np.stack(shares))
        return private_unit(private_embedding(plan["layers"], x), plan["norm_hint"]).matmul(rotation.t())

    # this party's template shares (its database), enrolled in one batch: each row is one photo's template, and
    # a batch costs the rounds of one image (what the verify latency below measures is one probe at a time)
    templates = embed(requests["enroll"])
    bits, stats = [], []
    for i, request in enumerate(requests["verify"]):
        # the bit is the only value ever opened
        bit, cost = measured(comm, lambda: int((embed([request]) * templates[i : i + 1]).sum()
                                               .ge(plan["threshold"]).get_plain_text().item()))
        stats.append(cost)
        bits.append(bit)
    if role == 0:
        (work / "bits.json").write_text(json.dumps(bits))
    (work / f"vstats{role}.json").write_text(json.dumps(stats))
    exit_now(None, 0)


def sdk_requests(work: Path, features: np.ndarray, pairs: list[Any], index: dict[str, int], spec_id: str) -> None:
    """The SDK's side: seal each photo's features to the two published keys; the relay writes the envelopes."""
    from client.sealed import seal_features

    for role in (0, 1):
        wait_for(work / f"pub{role}.txt")
    keys = {role: (work / f"pub{role}.txt").read_text() for role in (0, 1)}

    def request(path: str, operation: str) -> dict[str, Any]:
        context = {"transform_id": spec_id, "shape": list(features.shape[1:]), "nonce": os.urandom(16).hex(),
                   "operation": operation, "created_at": int(time.time())}
        return {"context": context, "envelopes": seal_features(features[index[path]], keys, context)}

    body = {"enroll": [request(p.left, "enroll") for p in pairs], "verify": [request(p.right, "verify") for p in pairs]}
    (work / "requests.tmp").write_text(json.dumps(body))
    (work / "requests.tmp").rename(work / "requests.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    child_arguments(ap, width=16)
    ap.add_argument("--pairs-per-fold", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=None, help="default: the twin's best on these pairs")
    ap.add_argument("--out", type=Path, default=Path("var/sealed/verify"))
    args = ap.parse_args()
    if args.role is not None:
        if args.role == DEALER_ROLE:
            from bench.sealed_mpc import child

            child(DEALER_ROLE, args.work, args.port)
        else:
            party(args.role, args.work, args.port)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    import subprocess

    import torch

    from common.paths import PROJECT_ROOT
    from devtools.net import free_port
    from inference.evaluation import best_threshold
    from inference.lfw import images_outside_pairs, lfw_dir, load_many
    from inference.protect import protection_matrix
    from inference.sealed_student import folded_layers
    from inference.transform import PRESETS, OsNoise, apply
    from training_jobs.evaluate import HeldoutSet

    torch.set_num_threads(1)
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("requests.json", "pub0.txt", "pub1.txt", "bits.json"):
        (work / stale).unlink(missing_ok=True)
    spec, lfw = PRESETS["dct8-v0"](64.0), lfw_dir()
    training = images_outside_pairs(lfw)[::100][:64]
    calibration = apply(load_many(lfw, training), spec, np.random.default_rng(0)).astype(np.float32)
    model, source = load_student(args.checkpoint, args.width, args.activation, spec.num_channels, calibration)
    held = HeldoutSet(lfw, (6, 7, 8, 9, 10), args.pairs_per_fold)
    features = apply(held.faces, spec, OsNoise()).astype(np.float32)  # the SDK's noise
    with torch.inference_mode():
        twin = model(torch.from_numpy(features)).double().numpy()
    left = np.array([held.index[p.left] for p in held.pairs])
    right = np.array([held.index[p.right] for p in held.pairs])
    twin_scores, same = np.sum(twin[left] * twin[right], axis=1), np.array([p.same for p in held.pairs])
    tau = float(args.threshold if args.threshold is not None else best_threshold(twin_scores, same))
    hint = float(np.median(np.linalg.norm(twin_raw(model, calibration), axis=1)))
    rotation = protection_matrix(os.urandom(32), "sealed-bench", 1, twin.shape[1])
    torch.save({"layers": folded_layers(model), "norm_hint": hint, "threshold": tau, "rotation": rotation},
               work / "plan.pt")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PRIVFACE_PARTY_SEALED_KEY", None)  # each party makes its own key
    procs = [subprocess.Popen([sys.executable, "-m", "bench.sealed_verify", "--role", str(r), "--work", str(work),
                               "--port", str(port)], cwd=PROJECT_ROOT, env=env,
                              stdout=open(work / f"role{r}.log", "wb"), stderr=subprocess.STDOUT)
             for r in (DEALER_ROLE, 0, 1)]
    try:
        sdk_requests(work, features, held.pairs, held.index, spec.transform_id)
        for proc in procs[1:]:
            if proc.wait(1800) != 0:
                raise RuntimeError(f"a party failed: see {work}/role*.log")
    finally:
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    bits = np.array(json.loads((work / "bits.json").read_text()), dtype=bool)
    vstats = [json.loads((work / f"vstats{r}.json").read_text()) for r in (0, 1)]
    seconds = sorted(s["seconds"] for s in vstats[0])
    result = {"model": source, "pairs": len(held.pairs), "folds": "6-10", "threshold": tau,
              "sealed_accepts_genuine": int(np.sum(bits & same)), "genuine": int(same.sum()),
              "sealed_refuses_impostor": int(np.sum(~bits & ~same)), "impostor": int((~same).sum()),
              "twin_decisions_equal": int(np.sum(bits == (twin_scores >= tau))),
              "verify_s_p50": statistics.median(seconds), "verify_s_p95": seconds[int(0.95 * (len(seconds) - 1))],
              "bytes_per_verify": [statistics.median(s["bytes"] for s in v) for v in vstats],
              "rounds_per_verify": [statistics.median(s["rounds"] for s in v) for v in vstats],
              "twin_margin_min": float(np.min(np.abs(twin_scores - tau)))}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
