"""End to end from raw photos, through the SDK, REST and MPC, on LFW fold 1 — next to plaintext.

1. Starts the real local stack (dealer, two parties, gateway) with fresh databases.
2. Detects, aligns and transforms every raw photo of `lfw-raw-fold1` once with the SDK (fresh noise).
3. 1:1: for each of the 600 pairs of `pairs_fold1.txt`, enrolls the first photo as a new subject and
   verifies the second against it (model v0's single served threshold).
4. 1:N: enrolls one photo of every identity, then identifies every other photo of an enrolled identity.
5. Recomputes every decision in plaintext from the very same feature payloads (same ONNX model, same
   tenant key, float cosine) and lists each disagreement with its score's distance to the threshold.

    python -m bench.e2e_fold1 [--limit-pairs N] [--out docs/results/e2e_fold1.json]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.auth import tenant_template_key
from common.paths import shared_dir
from devtools.localstack import LocalStack, NO_ABUSE_LIMITS
from client.detect import FaceDetector
from client.errors import PrivfaceError
from client.features import decode_features, extract_features, with_fresh_nonce
from client.sdk import PrivfaceClient
from inference.metadata import ModelMetadata
from inference.protect import protect_embedding
from inference.runtime import OrtEmbedder

RAW = "datasets/lfw-raw-fold1"


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

    def template(self, payload: dict, tenant: str) -> np.ndarray:
        features = decode_features(payload).astype(np.float32)[None]
        embedding = self.embedder.embed(features)[0]
        return protect_embedding(embedding, tenant_template_key(self.secret, tenant, 1), self.version, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-pairs", type=int, default=600)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench-e2e"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/e2e_fold1.json"))
    args = parser.parse_args(argv)
    raw = shared_dir() / RAW
    pairs = read_pairs(raw / "pairs_fold1.txt")[: args.limit_pairs]
    photos = sorted(str(p.relative_to(raw)) for p in raw.glob("*/*.jpg"))

    stack = LocalStack(args.workdir / time.strftime("%Y%m%d-%H%M%S"), extra_env=NO_ABUSE_LIMITS).start()
    try:
        report = run(stack, raw, photos, pairs)
    finally:
        stack.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "disagreements"}, indent=1))


def run(stack: LocalStack, raw: Path, photos: list[str], pairs: list[tuple[str, str, bool]]) -> dict:
    keys = {tenant: stack.api_key("enroll", "verify", tenant=tenant) for tenant in ("pairs", "gallery")}
    sdk = {tenant: PrivfaceClient(stack.url, key, timeout=120) for tenant, key in keys.items()}
    spec = sdk["pairs"].transform
    detector = FaceDetector()
    payloads, failures = {}, {}
    for name in tqdm(photos, desc="SDK features"):
        try:
            payloads[name] = extract_features(raw / name, spec, face_policy="largest", detector=detector)
        except PrivfaceError as exc:
            failures[name] = str(exc)
    version = json.loads(__import__("httpx").get(stack.url + "/readyz").text)["checks"]["model"]["version"]
    plain = Plaintext(stack, version)
    meta_threshold = plain.meta.threshold
    verify = verification(sdk["pairs"], plain, payloads, pairs, meta_threshold)
    ident = identification(sdk["gallery"], plain, payloads, meta_threshold)
    return {"model_version": version, "threshold": meta_threshold, "transform_id": spec.transform_id,
            "epsilon_per_image": spec.epsilon_per_image, "photos": len(photos), "detection_failures": failures,
            **verify, **ident}


def verification(client: PrivfaceClient, plain: Plaintext, payloads: dict, pairs, threshold: float) -> dict:
    rows = []
    for first, second, same in tqdm(pairs, desc="1:1 verify (MPC)"):
        if first not in payloads or second not in payloads:
            continue
        subject = client.create_subject()["id"]
        client.enroll_features(subject, with_fresh_nonce(payloads[first]))
        started = time.perf_counter()
        match = client.verify_features(subject, with_fresh_nonce(payloads[second]))
        elapsed = time.perf_counter() - started
        score = float(plain.template(payloads[first], "pairs") @ plain.template(payloads[second], "pairs"))
        rows.append({"pair": [first, second], "same": same, "mpc": match, "plain": score >= threshold,
                     "margin": score - threshold, "seconds": elapsed})
        client.delete_subject(subject)
    mpc_acc = np.mean([r["mpc"] == r["same"] for r in rows])
    plain_acc = np.mean([r["plain"] == r["same"] for r in rows])
    disagree = [r for r in rows if r["mpc"] != r["plain"]]
    return {"verify_pairs": len(rows), "verify_accuracy_mpc": float(mpc_acc), "verify_accuracy_plain": float(plain_acc),
            "verify_disagreements": len(disagree),
            "disagreements": [{"pair": r["pair"], "margin": r["margin"]} for r in disagree]}


def identification(client: PrivfaceClient, plain: Plaintext, payloads: dict, threshold: float) -> dict:
    by_identity = defaultdict(list)
    for name in sorted(payloads):
        by_identity[name.split("/")[0]].append(name)
    gallery = {identity: names[0] for identity, names in by_identity.items()}
    subjects, templates = {}, {}
    for identity, name in tqdm(sorted(gallery.items()), desc="1:N enroll"):
        subject = client.create_subject(external_id=identity)["id"]
        client.enroll_features(subject, with_fresh_nonce(payloads[name]))
        subjects[subject] = identity
        templates[identity] = plain.template(payloads[name], "gallery")
    order = sorted(templates)
    matrix = np.stack([templates[i] for i in order])
    probes = [(identity, name) for identity, names in by_identity.items() for name in names[1:]]
    rows = []
    for identity, name in tqdm(probes, desc="1:N identify (MPC)"):
        started = time.perf_counter()
        found = client.identify_features(with_fresh_nonce(payloads[name]))
        elapsed = time.perf_counter() - started
        scores = matrix @ plain.template(payloads[name], "gallery")
        best = int(np.argmax(scores))
        plain_found = order[best] if scores[best] >= threshold else None
        rows.append({"probe": name, "truth": identity, "mpc": subjects.get(found), "plain": plain_found,
                     "plain_rank1": order[best], "margin": float(scores[best] - threshold), "seconds": elapsed})
    n = len(rows)
    return {"gallery_size": len(gallery), "identify_probes": n,
            "identify_rank1_open_plain": sum(r["plain_rank1"] == r["truth"] for r in rows) / max(n, 1),
            "identify_correct_at_threshold_mpc": sum(r["mpc"] == r["truth"] for r in rows) / max(n, 1),
            "identify_correct_at_threshold_plain": sum(r["plain"] == r["truth"] for r in rows) / max(n, 1),
            "identify_disagreements": [{"probe": r["probe"], "mpc": r["mpc"], "plain": r["plain"],
                                        "margin": r["margin"]} for r in rows if r["mpc"] != r["plain"]],
            "identify_seconds_p50": float(np.percentile([r["seconds"] for r in rows], 50)) if rows else None}


if __name__ == "__main__":
    main()
