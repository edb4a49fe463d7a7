"""CrypTen's own private inference of the served model, beside the sealed student, in one run (issue 12's baseline).

    OMP_NUM_THREADS=1 python -m bench.crypten_baseline --images 3 --out var/sealed/crypten-baseline

What sealed mode is measured against: the served ONNX model (bundled `v1-accurate`: inverse-DCT adapter +
MobileFaceNet, flip test-time augmentation) through CrypTen's ONNX import, the way a CrypTen user would run it,
versus the bundled sealed student (`sealed-v2`, the project's `private_embedding` + `private_unit`) on the same
shares, in the same party processes, one image at a time. The served graph computes the same function as the
served model but is rewritten where CrypTen's importer refuses an operator: the pixel shuffle as
reshape/transpose (DepthToSpace is not imported), the horizontal flip as a product with the reversal matrix,
ReLU6 as relu(x) - relu(x - 6) (two comparisons, as CrypTen would need for a clip), Identity nodes removed; the
final L2 normalisation is left out (CrypTen has no ReduceL2; the student's time includes its own normalisation,
so the ratio favours the baseline slightly). The weights are public to both parties, as in sealed mode (CrypTen
computes conv(shared input, public weight) locally, no Beaver triple); `--encrypted-weights` also measures
CrypTen's documented `model.encrypt()`, which secret-shares the weights too.

Three processes on loopback (party 0, party 1, the project's dealer with CrypTen's TTP randomness from AES-CTR),
1 torch thread each. Inputs: the first `--images` held-out images of LFW View-2 folds 6-10 (noise at ε 64; the
draw is seeded here because this is a measurement, the SDK draws from the OS), fixed point, split with os.urandom.
Reported per model: wall and CPU seconds per image, bytes and rounds per party, and the largest error of the
opened embedding against the plaintext model (after normalising both, for the served one).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.sealed_mpc import hidden_child_arguments, join_mpc, measured, run_processes
from common.paths import PROJECT_ROOT

SERVED = PROJECT_ROOT / "inference" / "bundled" / "v1-accurate"
SEALED_ROOT, SEALED_VERSION = PROJECT_ROOT / "inference" / "bundled", "sealed-v2"
MODES = ("served", "sealed")


def crypten_ready_module(model: Any) -> Any:
    """The served FrequencyFaceModel as a module whose ONNX export CrypTen imports (same function, unnormalised)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from inference.dct import BLOCK

    class TwoRelus(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) - F.relu(x - 6.0)

    def replace_relu6(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, TwoRelus())
            else:
                replace_relu6(child)

    class ServedForCrypten(nn.Module):
        reverse: torch.Tensor  # a buffer (register_buffer), declared for the type checker

        def __init__(self) -> None:
            super().__init__()
            self.adapter, self.backbone = model.adapter, model.backbone
            replace_relu6(self.backbone)
            size = BLOCK * 14
            self.register_buffer("reverse", torch.eye(size).flip(1))  # x @ reverse flips the last axis

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            planes = self.adapter.idct(F.conv2d(features, self.adapter.scatter))
            n, side = planes.shape[0], planes.shape[-1]
            ycbcr = (planes.reshape(n, 3, BLOCK, BLOCK, side, side).permute(0, 1, 4, 2, 5, 3)
                     .reshape(n, 3, BLOCK * side, BLOCK * side))  # = F.pixel_shuffle(planes, BLOCK)
            image = F.conv2d(ycbcr, self.adapter.colour, self.adapter.colour_bias)
            return self.backbone(image) + self.backbone(torch.matmul(image, self.reverse))

    return ServedForCrypten().eval()


def onnx_for_crypten(module: Any, example: Any) -> bytes:
    """The module's ONNX (TorchScript exporter, no constant folding, as CrypTen's own from_pytorch does) with its
    Identity nodes removed (CrypTen does not import them)."""
    import warnings

    import onnx
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, dynamo=False,  # type: ignore[arg-type]  # BytesIO is accepted do_constant_folding=False, opset_version=13,
                          input_names=["features"], output_names=["embedding"])
    graph = onnx.load_from_string(buffer.getvalue())
    alias = {node.output[0]: node.input[0] for node in graph.graph.node if node.op_type == "Identity"}

    def source(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    kept = [node for node in graph.graph.node if node.op_type != "Identity"]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = source(name)
    for output in graph.graph.output:
        output.name = source(output.name)
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    return bytes(graph.SerializeToString())


def child(role: int, work: Path, port: int) -> None:
    """The dealer (role 2) or a party: both models on this party's share of each image."""
    import torch

    crypten = join_mpc(role, port, op_timeout_s=600)
    if crypten is None:
        return
    from secure.mpc.protocols.sealed_model import input_from_share, output_share, private_embedding, private_unit
    from secure.mpc.runtime.session import exit_now

    plan = torch.load(work / "plan.pt", weights_only=False)
    share = np.load(work / f"share{role}.npy")  # this party's share only
    comm = crypten.communicator.get()
    models = {"served": crypten.nn.from_onnx(io.BytesIO(plan["onnx"])).eval()}
    if plan["encrypted_weights"]:
        models["served-encrypted-weights"] = crypten.nn.from_onnx(io.BytesIO(plan["onnx"])).eval().encrypt(src=0)
    for module in models["served"].modules():  # public weights: CrypTen takes shared inputs into such a module
        module.encrypted = True
    outputs: dict[str, list[np.ndarray]] = {}
    stats: list[dict[str, Any]] = []
    def run(name: str, x: Any) -> Any:
        if name == "sealed":
            return private_unit(private_embedding(plan["layers"], x), plan["norm_hint"])
        return models[name](x)

    for i in range(share.shape[0]):
        for name in [*models, "sealed"]:
            with crypten.no_grad():
                result, cost = measured(comm, lambda: run(name, input_from_share(crypten, share[i:i + 1])))
            outputs.setdefault(name, []).append(output_share(result))
            stats.append({"model": name, "image": i, **cost})
    opened: dict[str, Any] = {name: np.concatenate(parts) for name, parts in outputs.items()}
    np.savez(work / f"out{role}.npz", **opened)
    (work / f"stats{role}.json").write_text(json.dumps(stats))
    exit_now(None, 0)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Features of held-out images, their shares, the plaintext references and the parties' plan."""
    import torch

    from inference.lfw import lfw_dir
    from inference.metadata import ModelMetadata
    from inference.onnx_weights import model_from_onnx
    from inference.sealed_export import load_checkpoint, twin_embed
    from inference.transform import apply
    from secure import fixedpoint, sharing
    from secure.party.sealed import load_sealed_model
    from training_jobs.evaluate import HeldoutSet

    torch.set_num_threads(1)
    spec = ModelMetadata.load(SERVED, verify=True).spec
    sealed = load_sealed_model(SEALED_ROOT, SEALED_VERSION)
    if sealed.transform_id != spec.transform_id:
        raise SystemExit(f"error: {SEALED_VERSION} reads {sealed.transform_id}, the served model {spec.transform_id}")
    held = HeldoutSet(lfw_dir(), (6, 7, 8, 9, 10), 1)
    features = apply(held.faces[: args.images], spec, np.random.default_rng(0)).astype(np.float32)
    served = model_from_onnx(SERVED / "model.onnx", spec)
    module = crypten_ready_module(served)
    with torch.inference_mode():
        reference = {"served": served(torch.from_numpy(features)).double().numpy()}
        rewritten = torch.nn.functional.normalize(module(torch.from_numpy(features)), dim=1).double().numpy()
    if not np.allclose(rewritten, reference["served"], atol=1e-4):
        raise SystemExit("error: the rewritten served graph does not compute the served model")
    checkpoint = PROJECT_ROOT / json.loads((SEALED_ROOT / SEALED_VERSION / "sealed.json").read_text())["source"][
        "checkpoint"]
    reference["sealed"] = twin_embed(load_checkpoint(checkpoint)[0])(features).astype(np.float64)
    s0, s1 = sharing.split(fixedpoint.encode(features))
    np.save(work / "share0.npy", s0)
    np.save(work / "share1.npy", s1)
    torch.save({"onnx": onnx_for_crypten(module, torch.from_numpy(features[:1])), "layers": sealed.layers,
                "norm_hint": sealed.norm_hint, "encrypted_weights": args.encrypted_weights}, work / "plan.pt")
    return {"reference": reference, "images": [str(p) for p in held.images[: args.images]]}


def summary(prep: dict[str, Any], work: Path) -> dict[str, Any]:
    """Per model: seconds, bytes, rounds per image and party; errors against the plaintext models."""
    from secure import fixedpoint, sharing

    stats = {role: json.loads((work / f"stats{role}.json").read_text()) for role in (0, 1)}
    out0, out1 = np.load(work / "out0.npz"), np.load(work / "out1.npz")
    result: dict[str, Any] = {"images": prep["images"], "folds": "6-10", "threads_per_process": 1, "models": {}}
    for name in out0.files:
        opened = fixedpoint.decode(sharing.reconstruct(out0[name], out1[name]))
        if name.startswith("served"):
            opened = opened / np.linalg.norm(opened, axis=1, keepdims=True)  # CrypTen's output is unnormalised
        reference = prep["reference"]["sealed" if name == "sealed" else "served"]
        rows = [(a, b) for a, b in zip(stats[0], stats[1]) if a["model"] == name]
        result["models"][name] = {
            "s_per_image_p50": statistics.median(a["seconds"] for a, _ in rows),
            "s_per_image_max": max(a["seconds"] for a, _ in rows),
            "cpu_s_per_image": [statistics.median(r[k]["cpu_s"] for r in rows) for k in (0, 1)],
            "mb_per_image": [statistics.median(r[k]["bytes"] for r in rows) / 1e6 for k in (0, 1)],
            "rounds_per_image": [statistics.median(r[k]["rounds"] for r in rows) for k in (0, 1)],
            "max_abs_error_unit_embedding": float(np.max(np.abs(opened - reference))),
            "min_cosine_to_plaintext": float(np.min(np.sum(opened * reference, axis=1)))}
    models = result["models"]
    for name in [n for n in models if n != "sealed"]:
        result[f"ratio_{name}_to_sealed"] = {
            "seconds": models[name]["s_per_image_p50"] / models["sealed"]["s_per_image_p50"],
            "bytes_party0": models[name]["mb_per_image"][0] / models["sealed"]["mb_per_image"][0]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    hidden_child_arguments(ap)
    ap.add_argument("--images", type=int, default=3, help="held-out images, each through every model")
    ap.add_argument("--encrypted-weights", action="store_true", help="also CrypTen's model.encrypt() variant")
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=Path("var/sealed/crypten-baseline"))
    args = ap.parse_args()
    if args.role is not None:
        child(args.role, args.work, args.port)
        return
    if args.images < 1:
        raise SystemExit("error: --images must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    prep = prepare(args, args.out)
    started = time.perf_counter()
    run_processes(args.out, args.timeout_s, module="bench.crypten_baseline")
    result = {**summary(prep, args.out), "wall_s": time.perf_counter() - started}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
