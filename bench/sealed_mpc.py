"""Sealed mode (issue 12): private inference of the sealed student on shares of real LFW features, measured.

    python -m bench.sealed_mpc --checkpoint var/training/cpu-sealed-quad/checkpoints/last.pt \
        --pairs-per-fold 20 --single 8 --out var/sealed/run1

Three real processes on loopback (party 0, party 1, the project's hardened dealer ``dealer_main``; CrypTen's
randomness from AES-CTR keyed per session, ``crypten_rng.py``), 1 torch thread each. The parent transforms the
held-out faces of LFW View-2 folds 6-10 (noise at the transform's epsilon), encodes them in fixed point and splits
them with ``secure.sharing.split`` (os.urandom): each party process reads only its own share file. Both parties run
``SealedEmbedder.query`` (the served path) on the images one at a time (``--single`` of them) and in batches of
``--batch``; the parent adds the output shares and compares each pair's decision with the plaintext twin's (the
PyTorch student) at the twin's best threshold on the same pairs (for counting disagreements only).
Without ``--checkpoint`` a randomly initialised student is measured (protocol and latency figures only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from common.paths import PROJECT_ROOT

T = TypeVar("T")

DEALER_ROLE = 2


def measured(comm: Any, step: Callable[[], T]) -> tuple[T, dict[str, float | int]]:
    """Run one timed MPC step: its result and its cost (wall and CPU seconds, bytes and rounds this party
    sent), the communicator's counters reset first. Both sealed benches time their steps this way."""
    comm.reset_communication_stats()
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = step()
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    st = comm.get_communication_stats()
    return result, {"seconds": seconds, "cpu_s": cpu_s, "bytes": int(st["bytes"]), "rounds": int(st["rounds"])}


def hidden_child_arguments(ap: argparse.ArgumentParser) -> None:
    """What `run_processes` passes a bench's own child process: its role, the rendezvous port, the work folder."""
    ap.add_argument("--role", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)


def child_arguments(ap: argparse.ArgumentParser, width: int) -> None:
    """The arguments both sealed benches share: the hidden ones of their child processes, and the student."""
    hidden_child_arguments(ap)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--width", type=int, default=width, help="random-init student only")
    ap.add_argument("--activation", default="quad", help="random-init student only")


def join_mpc(role: int, port: int, op_timeout_s: float = 300) -> Any:
    """A bench's child process on one thread: the dealer (role 2) serves until the parties are done and None is
    returned; a party (0/1) gets CrypTen initialised for its rank."""
    import torch

    torch.set_num_threads(1)
    from secure.mpc.settings import MpcSettings

    settings = MpcSettings(master_port=port, torch_threads=1, op_timeout_s=op_timeout_s, connect_timeout_s=120)
    if role == DEALER_ROLE:
        from secure.mpc.dealer.server import dealer_main

        dealer_main(settings.model_dump(), 1)
        return None
    from secure.mpc.runtime.session import init_crypten

    return init_crypten(role, settings)


def child(role: int, work: Path, port: int) -> None:
    """One MPC process: the dealer (role 2) or a party (0/1) running the plan in ``work``."""
    import torch

    crypten = join_mpc(role, port)
    if crypten is None:
        return
    from secure.mpc.protocols.sealed_model import SealedEmbedder, SealedQuery
    from secure.mpc.runtime.session import exit_now

    plan = torch.load(work / "plan.pt", weights_only=False)
    share = np.load(work / f"share{role}.npy")  # this party's share only
    comm = crypten.communicator.get()
    outputs, stats = np.zeros((share.shape[0], plan["dim"]), dtype=np.int64), []
    embedder, identity = SealedEmbedder(crypten), np.eye(plan["dim"])  # the served path, rotation = identity
    for kind, start, end in plan["runs"]:
        query = SealedQuery(features=share[start:end], layers=plan["layers"], norm_hint=plan["norm_hint"],
                            rotation=identity, digest="bench", flip_signs=plan["flip_signs"])
        outputs[start:end], cost = measured(comm, lambda: embedder.query(query))
        stats.append({"kind": kind, "images": end - start, **cost})
    np.save(work / f"out{role}.npy", outputs)
    (work / f"stats{role}.json").write_text(json.dumps(stats))
    exit_now(None, 0)


def calibrate(model: Any, features: np.ndarray) -> Any:
    """Random weights, BatchNorm statistics measured on training images (cumulative average), so that the
    activations stay near unit scale as in a trained student (raw random quadratic nets overflow fixed point)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(features))
    return model.eval()


def load_student(checkpoint: Path | None, width: int, activation: str, channels: int,
                 calibration: np.ndarray) -> tuple[Any, str]:
    import torch

    from inference.sealed_student import SealedCnn, SealedFaceModel, depth_of, head_of

    if checkpoint is None:
        torch.manual_seed(0)
        model = calibrate(SealedFaceModel(SealedCnn(channels, activation, width)), calibration)
        return model, f"random init (BatchNorm calibrated on 64 training images), {activation}, width {width}"

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model_cfg = state["config"]["model"]
    model = SealedFaceModel(SealedCnn(channels, model_cfg.get("activation", "quad"), int(model_cfg.get("width", 128)),
                                      depth=depth_of(state["student"]), head=head_of(state["student"])))
    model.load_state_dict(state["student"])
    return model.eval(), f"{checkpoint} (epoch {state['epoch']})"


def twin_raw(model: Any, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        raw: np.ndarray = model.raw(torch.from_numpy(features)).double().numpy()
    return raw


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Features, shares, the plaintext twin's embeddings and the plan the parties run."""
    import torch

    from inference.lfw import images_outside_pairs, lfw_dir, load_many
    from inference.sealed_student import flip_signs, folded_layers
    from inference.transform import PRESETS, apply
    from secure import fixedpoint, sharing
    from training_jobs.evaluate import HeldoutSet

    torch.set_num_threads(1)
    spec = PRESETS["dct8-v0"](args.epsilon)
    lfw = lfw_dir()
    rng = np.random.default_rng(0)  # evaluation noise (measurement only; the SDK draws from os.urandom)
    training = images_outside_pairs(lfw)[:: max(1, len(images_outside_pairs(lfw)) // 64)][:64]
    calibration = apply(load_many(lfw, training), spec, rng).astype(np.float32)
    model, source = load_student(args.checkpoint, args.width, args.activation, spec.num_channels, calibration)
    model.flip = flip_signs(spec) if args.flip else None
    hint = float(np.median(np.linalg.norm(twin_raw(model, calibration), axis=1)))
    held = HeldoutSet(lfw, (6, 7, 8, 9, 10), args.pairs_per_fold)
    features = apply(held.faces, spec, rng).astype(np.float32)
    with torch.inference_mode():
        twin = model(torch.from_numpy(features)).double().numpy()  # the plaintext twin: unit embeddings
    s0, s1 = sharing.split(fixedpoint.encode(features))
    np.save(work / "share0.npy", s0)
    np.save(work / "share1.npy", s1)
    n = len(held.images)
    runs = [("batch1", i, i + 1) for i in range(min(args.single, n))]
    runs += [(f"batch{args.batch}", i, min(i + args.batch, n)) for i in range(0, n, args.batch)]
    layers = folded_layers(model)
    torch.save({"layers": layers, "norm_hint": hint, "dim": twin.shape[1], "runs": runs,
                "flip_signs": tuple(model.flip) if model.flip else None}, work / "plan.pt")
    from secure.mpc.protocols.sealed_model import activation_count

    return {"held": held, "twin": twin, "source": source, "norm_hint": hint, "spec": spec.transform_id,
            "flip": bool(model.flip),
            "activations": activation_count(layers, spec.shape) * (2 if model.flip else 1)}  # flip: two images


def run_processes(work: Path, timeout_s: float, module: str = "bench.sealed_mpc") -> None:
    """The dealer and both parties as `python -m <module> --role R` (each bench's own child), 1 thread each."""
    from devtools.net import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    procs = {role: subprocess.Popen([sys.executable, "-m", module, "--role", str(role), "--work",
                                     str(work), "--port", str(port)], cwd=PROJECT_ROOT, env=env,
                                    stdout=open(work / f"role{role}.log", "wb"), stderr=subprocess.STDOUT)
             for role in (DEALER_ROLE, 0, 1)}
    try:
        for role in (0, 1):
            code = procs[role].wait(timeout_s)
            if code != 0:
                raise RuntimeError(f"party {role} exited {code}: see {work}/role{role}.log")
    finally:
        for proc in procs.values():  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def report(prep: dict[str, Any], work: Path) -> dict[str, Any]:
    from inference.evaluation import best_threshold
    from secure import fixedpoint, sharing

    mpc = fixedpoint.decode(sharing.reconstruct(np.load(work / "out0.npy"), np.load(work / "out1.npy")))
    held, twin = prep["held"], prep["twin"]
    left = np.array([held.index[p.left] for p in held.pairs])
    right = np.array([held.index[p.right] for p in held.pairs])
    same = np.array([p.same for p in held.pairs])
    twin_scores = np.sum(twin[left] * twin[right], axis=1)
    mpc_scores = np.sum(mpc[left] * mpc[right], axis=1)
    tau = best_threshold(twin_scores, same)
    stats = {role: json.loads((work / f"stats{role}.json").read_text()) for role in (0, 1)}
    out: dict[str, Any] = {
        "model": prep["source"], "transform": prep["spec"], "activations_per_image": prep["activations"],
        "test_time_flip": prep["flip"],
        "pairs": len(held.pairs), "images": len(held.images), "folds": "6-10", "threshold": float(tau),
        "twin_accuracy": float(np.mean((twin_scores >= tau) == same)),
        "mpc_accuracy": float(np.mean((mpc_scores >= tau) == same)),
        "disagreements": int(np.sum((twin_scores >= tau) != (mpc_scores >= tau))),
        # a disagreement is a fixed-point tie when the twin's score lies within the measured score error of tau
        "disagreements_beyond_ties": int(np.sum(((twin_scores >= tau) != (mpc_scores >= tau))
                                                & (np.abs(twin_scores - tau) > np.max(np.abs(mpc_scores - twin_scores))))),
        "max_abs_embedding_error": float(np.max(np.abs(mpc - twin))),
        "max_abs_score_error": float(np.max(np.abs(mpc_scores - twin_scores)))}
    for kind in sorted({s["kind"] for s in stats[0]}):
        rows = [(s0, s1) for s0, s1 in zip(stats[0], stats[1]) if s0["kind"] == kind]
        per_image = [s0["seconds"] / s0["images"] for s0, _ in rows]
        images = sum(s0["images"] for s0, _ in rows)
        out[kind] = {"runs": len(rows), "s_per_image_p50": statistics.median(per_image),
                     "s_per_image_max": max(per_image),
                     # CPU seconds of each party process per image: what the wall time would be without contention
                     # if communication were free (the load on a shared machine inflates wall time, not this)
                     "cpu_s_per_image": [sum(r[k]["cpu_s"] for r in rows) / images for k in (0, 1)],
                     "bytes_per_image": [sum(r[k]["bytes"] for r in rows) / images for k in (0, 1)],
                     "rounds_per_run": [statistics.median(r[k]["rounds"] for r in rows) for k in (0, 1)]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    child_arguments(ap, width=32)
    ap.add_argument("--epsilon", type=float, default=64.0)
    ap.add_argument("--pairs-per-fold", type=int, default=20)
    ap.add_argument("--single", type=int, default=8, help="images measured one at a time (batch 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--flip", action="store_true", help="test-time flip: e(x) + e(flip x) (a bundle with flip_signs)")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=Path("var/sealed/run"))
    args = ap.parse_args()
    if args.role is not None:
        child(args.role, args.work, args.port)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    prep = prepare(args, args.out)
    t0 = time.perf_counter()
    run_processes(args.out, args.timeout_s)
    result = report(prep, args.out)
    result["wall_s"] = time.perf_counter() - t0
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
