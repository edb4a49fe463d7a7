"""Learn how a transform spends its noise budget: per-channel ε weights, adversarially against an inverter.

Issue 10 asks for noise scales per channel "learned adversarially against the inverter under a fixed total
budget". A spec's per-image ε is 196 * sum_c ε_c; an allocation keeps that sum (weights of mean 1,
`TransformSpec.epsilon_weights`) and moves ε between channels: more noise where the inverter gains most, less
where the served model needs the detail.

The game, on the attacker's training split only (LFW identities outside View-2 folds 6-10):
- an A1 inverter (`training_jobs.attacks.a1_inverter`) learns to rebuild the face from the noisy features
  under the current allocation;
- the allocation (one softmax logit per channel) minimises  mu * recognition loss - inverter loss, where the
  recognition loss is 1 - cos between the frozen model's embedding of the noisy and of the clean features, and
  mu is a Lagrange multiplier holding the recognition loss at its even-allocation value + `slack`.
Noise is reparameterised (features + b_c / w_c * standard Laplace), so both losses are differentiable in w. The
noise here simulates the SDK's and protects nothing, so a seeded torch generator is the right tool.

The allocation is only a candidate: it is judged like every transform, by FRESH attackers trained from scratch
on it (`python -m training_jobs.attacks run --transform <name>`) and by the model's held-out accuracy.

    nice -n 5 python -m training_jobs.noise_allocation --base dct8-low8 \\
        --model training_jobs/checkpoints/v4-balanced --name dct8-low8-adv --steps 400
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.lfw import lfw_dir, load_many, shared_dir
from inference.transform import ALLOCATIONS, PRESETS, TransformSpec, clipped
from training_jobs.attacks.a1_inverter import Inverter, image_loss
from training_jobs.attacks.data import attacker_split, normaliser, to_unit
from training_jobs.students import build_student

LOG_EVERY = 25
MU_RATE = 0.05  # multiplicative step of the Lagrange multiplier per allocation step


def standard_laplace(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Laplace(0, 1) draws by the inverse CDF (differentiable scaling happens outside)."""
    u = torch.rand(shape, generator=generator) - 0.5
    return -torch.sign(u) * torch.log1p(-2.0 * u.abs().clamp(max=0.5 - 1e-7))


def allocation_weights(logits: torch.Tensor) -> torch.Tensor:
    """K * softmax: positive weights of mean exactly 1 (the same total ε), all ones at logits = 0."""
    return logits.numel() * F.softmax(logits, dim=0)


def training_data(lfw: Path, spec: TransformSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped clean features [N, K, 14, 14], faces uint8 [N, 112, 112, 3]) of the attacker's training split."""
    faces = load_many(lfw, attacker_split(lfw).train_images)
    features = np.concatenate([clipped(faces[i:i + 256], spec) for i in range(0, len(faces), 256)])
    return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(faces)


class Game:
    """The inverter, the allocation and the multiplier, with one optimiser each; checkpointed as one dict."""

    def __init__(self, spec: TransformSpec, lr: float, alloc_lr: float) -> None:
        self.spec = spec
        self.inverter = Inverter(spec.num_channels)
        self.logits = torch.zeros(spec.num_channels, requires_grad=True)
        self.inverter_opt = torch.optim.Adam(self.inverter.parameters(), lr=lr)
        self.alloc_opt = torch.optim.Adam([self.logits], lr=alloc_lr)
        self.mu = 1.0
        self.step = 0
        self.even_recognition: list[float] = []  # recognition loss under the even allocation (warm-up)
        self.history: list[dict[str, float]] = []
        self.base_scale = torch.as_tensor(spec.noise_scales(), dtype=torch.float32).view(1, -1, 1, 1)
        self.unit = normaliser(spec).unsqueeze(0)

    def state(self) -> dict[str, Any]:
        return {"inverter": self.inverter.state_dict(), "logits": self.logits.detach().clone(),
                "inverter_opt": self.inverter_opt.state_dict(), "alloc_opt": self.alloc_opt.state_dict(),
                "mu": self.mu, "step": self.step, "even_recognition": self.even_recognition, "history": self.history}

    def load(self, state: dict[str, Any]) -> None:
        self.inverter.load_state_dict(state["inverter"])
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.inverter_opt.load_state_dict(state["inverter_opt"])
        self.alloc_opt.load_state_dict(state["alloc_opt"])
        self.mu, self.step = float(state["mu"]), int(state["step"])
        self.even_recognition, self.history = list(state["even_recognition"]), list(state["history"])

    def noisy(self, clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        scale = self.base_scale / allocation_weights(self.logits).view(1, -1, 1, 1)
        return clean + scale * standard_laplace(tuple(clean.shape), generator)

    def inverter_step(self, features: torch.Tensor, images: torch.Tensor) -> float:
        loss, _ = image_loss(self.inverter(features.detach() / self.unit), images, 0.0)
        self.inverter_opt.zero_grad()
        loss.backward()
        self.inverter_opt.step()
        return loss.item()

    def allocation_step(self, model: torch.nn.Module, features: torch.Tensor, target: torch.Tensor,
                        images: torch.Tensor, slack: float) -> tuple[float, float]:
        """One step of the allocation against the current inverter; returns (recognition loss, inverter loss)."""
        recognition = 1.0 - (model(features) * target).sum(dim=1).mean()
        inversion, _ = image_loss(self.inverter(features / self.unit), images, 0.0)
        self.alloc_opt.zero_grad()
        (self.mu * recognition - inversion).backward()
        self.alloc_opt.step()
        bound = float(np.mean(self.even_recognition)) + slack
        self.mu = min(max(self.mu * math.exp(MU_RATE * (recognition.item() - bound) / max(bound, 1e-3)), 1e-3), 1e4)
        return recognition.item(), inversion.item()


def play(game: Game, model: torch.nn.Module, clean: torch.Tensor, faces: torch.Tensor, args: argparse.Namespace,
         checkpoint: Path) -> None:
    """Warm-up (inverter alone, recognition loss of the even allocation measured), then alternate the players."""
    rng = np.random.default_rng([args.seed, game.step])
    generator = torch.Generator().manual_seed(args.seed * 100_003 + game.step)
    started = time.perf_counter()
    while game.step < args.steps:
        index = torch.from_numpy(rng.integers(0, len(clean), args.batch))
        features, images = game.noisy(clean[index], generator), to_unit(faces[index])
        with torch.no_grad():
            target = model(clean[index])
        inversion = game.inverter_step(features, images)
        if game.step < args.warmup:
            with torch.no_grad():
                game.even_recognition.append(float(1.0 - (model(features) * target).sum(dim=1).mean()))
            recognition = game.even_recognition[-1]
        else:
            recognition, inversion = game.allocation_step(model, features, target, images, args.slack)
        game.step += 1
        if game.step % LOG_EVERY == 0 or game.step == args.steps:
            weights = allocation_weights(game.logits).detach()
            game.history.append({"step": game.step, "recognition": round(recognition, 4),
                                 "inversion": round(inversion, 4), "mu": round(game.mu, 4),
                                 "weight_min": round(float(weights.min()), 4), "weight_max": round(float(weights.max()), 4)})
            print(f"step {game.step}/{args.steps} {game.history[-1]} "
                  f"{(time.perf_counter() - started) / LOG_EVERY:.2f} s/step", flush=True)
            started = time.perf_counter()
            torch.save(game.state(), checkpoint)


def write_allocation(game: Game, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    weights = allocation_weights(game.logits).detach().double().numpy()
    weights = weights / weights.mean()
    record = {"name": args.name, "base": args.base, "weights": [float(w) for w in weights],
              "learned_against": "A1 inverter, trained alongside (training_jobs.attacks.a1_inverter)",
              "model": str(args.model), "data": "LFW identities outside View-2 folds 6-10 (the attacker's split)",
              "steps": game.step, "warmup": args.warmup, "batch": args.batch, "slack": args.slack,
              "even_recognition_loss": float(np.mean(game.even_recognition)), "history": game.history,
              "command": "python -m training_jobs.noise_allocation " + " ".join(args.argv)}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training_jobs.noise_allocation", description=__doc__.splitlines()[0])
    p.add_argument("--base", choices=sorted(PRESETS), required=True, help="the transform whose ε is reallocated")
    p.add_argument("--model", type=Path, required=True, help="a served model folder for that transform (model.onnx)")
    p.add_argument("--name", required=True, help="the allocated transform's name (inference/transforms/allocations/)")
    p.add_argument("--epsilon", type=float, default=64.0, help="mean ε per coefficient (the total budget)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=100, help="inverter-only steps before the allocation moves")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--slack", type=float, default=0.05, help="recognition loss allowed above the even allocation's")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alloc-lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=Path("var/noise_allocation"))
    p.add_argument("--out-dir", type=Path, default=ALLOCATIONS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if not (args.model / "model.onnx").is_file():
        raise SystemExit(f"error: no model.onnx in {args.model}")
    if not 1 <= args.warmup < args.steps:  # the warm-up measures the even allocation's loss the multiplier holds to
        raise SystemExit(f"error: --warmup must be at least 1 and below --steps ({args.steps}), not {args.warmup}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = PRESETS[args.base](args.epsilon)
    shared = shared_dir()
    model = build_student({"adapter_learnable": False, "init_onnx": str(args.model / "model.onnx")}, spec, shared).eval()
    model.requires_grad_(False)
    clean, faces = training_data(lfw_dir(shared), spec)
    game = Game(spec, args.lr, args.alloc_lr)
    run_dir = args.runs_dir / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.is_file():
        game.load(torch.load(checkpoint, weights_only=False))
        print(f"resumed at step {game.step}", flush=True)
    play(game, model, clean, faces, args, checkpoint)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return write_allocation(game, args, args.out_dir / f"{args.name}.json")


if __name__ == "__main__":
    main()
