"""End to end through the private path — SDK, REST, MPC — next to plaintext, on people no model trained on.

1. Starts the real local stack (dealer, two parties, gateway) with fresh databases; with `--bundled`, the
   stack serves the trained preset models (`inference/bundled/`) and the tenant uses `--preset`.
2. Runs every photo through the SDK once (detect, align, transform, fresh noise). Sources:
   `heldout` (default): LFW View-2 folds 6-10 pairs, aligned photos (the SDK re-detects and re-aligns them);
   no trained model or attacker saw these identities. `raw-fold1`: the raw photos of fold 1 (unaligned; fold 1
   identities ARE training identities of the trained models, so only for the untrained v0).
3. 1:1: for each pair, enrolls the first photo as a new subject and verifies the second against it.
4. 1:N: enrolls one photo of every identity, then identifies every other photo of an enrolled identity.
5. Recomputes every decision in plaintext from the very same feature payloads (same ONNX model, same
   tenant key, float cosine) and lists each disagreement with its score's distance to the threshold.

    python -m bench.e2e [--source heldout] [--bundled --preset balanced] [--limit-pairs N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from app.auth import tenant_template_key
from app.services.model_registry import gallery_policy
from common.paths import shared_dir
from devtools.localstack import MODEL_CACHE, NO_ABUSE_LIMITS, LocalStack
from client.detect import FaceDetector
from client.errors import InvalidRequestError, PrivfaceError
from client.features import FeaturePayload, decode_features, extract_features, with_fresh_nonce
from client.sdk import PrivfaceClient
from inference.metadata import ModelMetadata
from inference.protect import protect_embedding
from inference.runtime import OrtEmbedder

RAW = "datasets/lfw-raw-fold1"
ALIGNED = "datasets/lfw-aligned-112"
HELDOUT_FOLDS = (6, 7, 8, 9, 10)
BUNDLED = Path(__file__).resolve().parent.parent / "inference" / "bundled"


def heldout_pairs(limit: int) -> list[tuple[str, str, bool]]:
    """`limit` pairs spread evenly over folds 6-10 (the first of each fold, genuine and impostor alike)."""
    from inference.lfw import lfw_dir, read_pairs as read_view2
    per_fold = max(1, limit // len(HELDOUT_FOLDS))
    chosen = []
    for fold in HELDOUT_FOLDS:
        pairs = [p for p in read_view2(lfw_dir()) if p.fold == fold]
        genuine, impostor = [p for p in pairs if p.same], [p for p in pairs if not p.same]
        half = per_fold // 2
        chosen += [(p.left, p.right, p.same) for p in genuine[: per_fold - half] + impostor[:half]]
    return chosen


def read_pairs(path: Path) -> list[tuple[str, str, bool]]:
    pairs = []
    for line in path.read_text().splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) == 3:
            pairs.append((f"{parts[0]}/{parts[0]}_{int(parts[1]):04d}.jpg",
                          f"{parts[0]}/{parts[0]}_{int(parts[2]):04d}.jpg", True))
        elif len(parts) == 4:
            pairs.append((f"{parts[0]}/{parts[0]}_{int(parts[1]):04d}.jpg",
                          f"{parts[2]}/{parts[2]}_{int(parts[3]):04d}.jpg", False))
    return pairs


class Plaintext:
    """The same decisions computed in the clear from the same payloads (this script plays every role)."""

    def __init__(self, stack: LocalStack, version: str) -> None:
        self.meta = ModelMetadata.load(stack.model_dir / version)
        self.embedder = OrtEmbedder(stack.model_dir / version / self.meta.onnx_file, prefer_gpu=False)
        self.secret, self.version = stack.secret, version
        # identify runs at the model's schedule for the stack's FPIR, as the gateway registers it per gallery
        fpir = float(stack.env()["PRIVFACE_IDENTIFY_FPIR"])
        self.policy = gallery_policy(self.meta, self.meta.threshold, fpir)

    @property
    def identify_threshold(self) -> Callable[[int], float]:
        return self.policy.identify_threshold

    def template(self, payload: FeaturePayload, tenant: str) -> np.ndarray:
        features = decode_features(payload).astype(np.float32)[None]
        embedding = self.embedder.embed(features)[0]
        return protect_embedding(embedding, tenant_template_key(self.secret, tenant, 1), self.version, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("heldout", "raw-fold1"), default="heldout")
    parser.add_argument("--limit-pairs", type=int, default=600)
    parser.add_argument("--bundled", action="store_true", help="serve the trained preset models (inference/bundled)")
    parser.add_argument("--preset", default=None, help="the tenant's privacy preset (with --bundled)")
    parser.add_argument("--workdir", type=Path, default=Path("var/bench-e2e"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.source == "heldout":
        root = shared_dir() / ALIGNED
        pairs = heldout_pairs(args.limit_pairs)
        photos = sorted({name for pair in pairs for name in pair[:2]})
    else:
        root = shared_dir() / RAW
        pairs = read_pairs(root / "pairs_fold1.txt")[: args.limit_pairs]
        photos = sorted(str(p.relative_to(root)) for p in root.glob("*/*.jpg"))
    env = dict(NO_ABUSE_LIMITS)
    workdir = args.workdir / time.strftime("%Y%m%d-%H%M%S")
    if args.bundled:
        env.update({"PRIVFACE_BUNDLED_MODEL_DIR": str(BUNDLED), "PRIVFACE_IDENTIFY_FPIR": "0.01"})
    stack = LocalStack(workdir, model_dir=workdir / "models" if args.bundled else MODEL_CACHE, extra_env=env).start()
    try:
        report = run(stack, root, photos, pairs, args.preset)
    finally:
        stack.stop()
    report["source"] = args.source
    out = args.out or Path(f"docs/results/e2e_{args.source}_{report['model_version']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if "disagreements" not in k and k != "detection_failures"},
                     indent=1))


def run(stack: LocalStack, raw: Path, photos: list[str], pairs: list[tuple[str, str, bool]],
        preset: str | None = None) -> dict:
    keys = {tenant: stack.api_key("enroll", "verify", "admin", tenant=tenant) for tenant in ("pairs", "gallery")}
    if preset is not None:
        for key in keys.values():
            httpx.put(stack.url + "/v1/admin/tenant/preset", json={"preset": preset},
                      headers={"Authorization": f"Bearer {key}"}).raise_for_status()
    sdk = {tenant: PrivfaceClient(stack.url, key, timeout=120) for tenant, key in keys.items()}
    spec = sdk["pairs"].transform
    detector = FaceDetector()
    payloads, failures = {}, {}
    for name in tqdm(photos, desc="SDK features"):
        try:
            payloads[name] = extract_features(raw / name, spec, face_policy="largest", detector=detector)
        except PrivfaceError as exc:
            failures[name] = str(exc)
    version = sdk["pairs"].transforms()[0]["model_version"]
    plain = Plaintext(stack, version)
    meta_threshold = plain.meta.threshold
    verify = verification(sdk["pairs"], plain, payloads, pairs, meta_threshold)
    ident = identification(sdk["gallery"], plain, payloads, plain.identify_threshold)
    return {"model_version": version, "preset": preset, "threshold": meta_threshold, "transform_id": spec.transform_id,
            "epsilon_per_image": spec.epsilon_per_image, "photos": len(photos), "detection_failures": failures,
            **verify, **ident}


def verification(client: PrivfaceClient, plain: Plaintext, payloads: dict, pairs, threshold: float) -> dict:
    rows: list[dict] = []
    refused: list[dict] = []
    for first, second, same in tqdm(pairs, desc="1:1 verify (MPC)"):
        if first not in payloads or second not in payloads:
            continue
        subject = client.create_subject()["id"]
        try:
            client.enroll_features(subject, with_fresh_nonce(payloads[first]))
            started = time.perf_counter()
            match = client.verify_features(subject, with_fresh_nonce(payloads[second]))
        except InvalidRequestError as exc:  # e.g. the quality gate refused a real face: counted, not fatal
            refused.append({"pair": [first, second], "same": same, "error": str(exc)[:200]})
            client.delete_subject(subject)
            continue
        elapsed = time.perf_counter() - started
        score = float(plain.template(payloads[first], "pairs") @ plain.template(payloads[second], "pairs"))
        rows.append({"pair": [first, second], "same": same, "mpc": match, "plain": score >= threshold,
                     "margin": score - threshold, "seconds": elapsed})
        client.delete_subject(subject)
    mpc_acc = np.mean([r["mpc"] == r["same"] for r in rows])
    plain_acc = np.mean([r["plain"] == r["same"] for r in rows])
    disagree = [r for r in rows if r["mpc"] != r["plain"]]
    return {"verify_pairs": len(rows), "verify_accuracy_mpc": float(mpc_acc), "verify_accuracy_plain": float(plain_acc),
            "verify_disagreements": len(disagree), "verify_refused": refused,
            "disagreements": [{"pair": r["pair"], "margin": r["margin"]} for r in disagree]}


def identification(client: PrivfaceClient, plain: Plaintext, payloads: dict,
                   threshold_at: Callable[[int], float]) -> dict:
    by_identity = defaultdict(list)
    for name in sorted(payloads):
        by_identity[name.split("/")[0]].append(name)
    gallery = {identity: names[0] for identity, names in by_identity.items()}
    subjects, templates = {}, {}
    refused: list[dict] = []
    for identity, name in tqdm(sorted(gallery.items()), desc="1:N enroll"):
        subject = client.create_subject(external_id=identity)["id"]
        try:
            client.enroll_features(subject, with_fresh_nonce(payloads[name]))
        except InvalidRequestError as exc:
            refused.append({"photo": name, "error": str(exc)[:200]})
            continue
        subjects[subject] = identity
        templates[identity] = plain.template(payloads[name], "gallery")
    order = sorted(templates)
    matrix = np.stack([templates[i] for i in order])
    threshold = threshold_at(len(order))
    probes = [(identity, name) for identity, names in by_identity.items() for name in names[1:] if identity in templates]
    rows = []
    for identity, name in tqdm(probes, desc="1:N identify (MPC)"):
        started = time.perf_counter()
        try:
            found = client.identify_features(with_fresh_nonce(payloads[name]))
        except InvalidRequestError as exc:
            refused.append({"photo": name, "error": str(exc)[:200]})
            continue
        elapsed = time.perf_counter() - started
        scores = matrix @ plain.template(payloads[name], "gallery")
        best = int(np.argmax(scores))
        plain_found = order[best] if scores[best] >= threshold else None
        rows.append({"probe": name, "truth": identity, "mpc": subjects.get(found), "plain": plain_found,
                     "plain_rank1": order[best], "margin": float(scores[best] - threshold), "seconds": elapsed})
    n = len(rows)
    return {"gallery_size": len(templates), "identify_probes": n, "identify_threshold": threshold,
            "identify_refused": refused,
            "identify_rank1_open_plain": sum(r["plain_rank1"] == r["truth"] for r in rows) / max(n, 1),
            "identify_correct_at_threshold_mpc": sum(r["mpc"] == r["truth"] for r in rows) / max(n, 1),
            "identify_correct_at_threshold_plain": sum(r["plain"] == r["truth"] for r in rows) / max(n, 1),
            "identify_disagreements": [{"probe": r["probe"], "mpc": r["mpc"], "plain": r["plain"],
                                        "margin": r["margin"]} for r in rows if r["mpc"] != r["plain"]],
            "identify_seconds_p50": float(np.percentile([r["seconds"] for r in rows], 50)) if rows else None}


if __name__ == "__main__":
    main()
