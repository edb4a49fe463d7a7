"""Render a model card (Markdown) from what was measured: a model version's model.json, its training config,
and the attack harness's results for its transform.

    python -m training_jobs.model_card --model inference/bundled/v1-low10-gpu \
        --config training_jobs/configs/gpu-low10.yaml --out docs/models/card-v1-low10-gpu.md

Why generated: a card written by hand drifts from the numbers; this one only formats figures that the export
(held-out folds 6-10, impostor curve on people in no View-2 fold) and the attacks (folds 6-10) recorded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from inference.metadata import ModelMetadata
from inference.operating_points import ImpostorCurve
from inference.privacy_presets import preset_of_transform
from training_jobs.datasets import EXTRA_FACES_LICENSE
from training_jobs.frontier import attack_figures
from training_jobs.train_config import load_config

ATTACK_NAMES = {"a1": "A1 CNN inverter", "a2": "A2 inverter + identity loss + refiner"}
IDENTIFY_SIZES = (200, 2_000, 100_000)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def recipe(config: dict[str, Any]) -> list[str]:
    model, loss, optim = config["model"], config["loss"], config["optim"]
    kind = model.get("kind", "frequency-mobilefacenet")
    start = (f"MobileFaceNet started, adapter included, from the served `{Path(model['init_onnx']).parent.name}` "
             "(its BatchNorms folded and frozen)" if model.get("init_onnx") else "pretrained MobileFaceNet (foamliu)")
    context = (f", plus block-context convolutions ({model['context_width']} channels, two 3x3 over the grid of "
               "blocks, started at zero)") if model.get("context_width") else ""
    arch = ("learnable inverse-DCT adapter (1x1 conv initialised to the exact inverse DCT" + context + ") + "
            f"{start}, flip test-time augmentation") if kind == "frequency-mobilefacenet" else \
        f"sealed CNN on the 14x14 DCT planes ({model.get('activation')} activations, width {model.get('width')})"
    return [f"| Architecture | {arch} |",
            f"| Loss | {loss['identity_weight']} x CosFace (s {loss['head']['scale']}, m {loss['head']['margin']}, "
            f"centres from the teacher) + {loss['distill_weight']} x (1 - cos) distillation from the pixel "
            f"{config['teacher']} on the same augmented face |",
            f"| Optimiser | AdamW, lr {optim['lr']} (adapter {optim['adapter_lr']}, head {optim['head_lr']}), "
            f"batch {optim['batch_size']}, warm-up then cosine, weight decay {optim['weight_decay']} |",
            f"| Augmentation | {config['augment']} (before the transform; fresh noise per sample and epoch) |"]


def render(meta: ModelMetadata, config: dict[str, Any], attacks: list[dict[str, Any]]) -> str:
    spec = meta.spec
    heldout = meta.metrics.get("heldout", {})
    training = meta.metrics.get("training", {})
    verification = heldout.get("verification", {})
    tars = heldout.get("tar_at_far", {})
    curve = ImpostorCurve.from_dict(meta.impostor_curve) if meta.impostor_curve else None
    preset = preset_of_transform(spec.name)
    lines = [f"# Model card: {meta.version} (privacy preset `{preset}`)", "", "| | |", "|---|---|",
             f"| Input | transform `{spec.name}` = `{spec.transform_id}`: {spec.num_channels} DCT planes of 14x14, "
             f"Laplace ε {spec.epsilon_per_coefficient:g} per coefficient (`docs/noise.md`) |",
             "| Output | 128-d embedding, L2-normalised; cosine score |",
             f"| Training data | LFW identities in none of View-2 folds 6-10: {training.get('train_images')} images of "
             f"{training.get('train_identities')} identities; {training.get('epochs')} epochs "
             f"({training.get('steps')} steps) |",
             "| Teacher | pretrained pixel MobileFaceNet (its authors trained it on MS-Celeb-derived data; research use) |",
             *([f"| Extra faces | unlabelled CelebA photos, distillation only (`training_jobs/extra_faces.py`: "
                f"re-aligned, look-alikes of folds 6-10 dropped). {EXTRA_FACES_LICENSE} |"]
               if config.get("data", {}).get("extra_faces") else []),
             *recipe(config),
             f"| ONNX | `{meta.onnx_file}` sha256 `{meta.sha256[:16]}…`, ORT vs PyTorch max diff "
             f"{meta.ort_vs_torch_max_abs_diff:.1e} |", "",
             "## Accuracy (LFW View-2 folds 6-10, never used for training or tuning)",
             f"{heldout.get('num_pairs')} pairs, served noise: accuracy **{pct(verification.get('accuracy'))}** "
             f"± {pct(verification.get('accuracy_std'))} (leave-one-fold-out threshold), TAR@FAR 1e-3 "
             f"{pct(tars.get('0.001', {}).get('tar'))}, TAR@FAR 1e-4 {pct(tars.get('0.0001', {}).get('tar'))} "
             f"(FAR resolution {tars.get('far_resolution', 0):.1e}: 1e-4 is below what 1,500 impostor pairs "
             f"resolve), 1:N rank-1 {pct(heldout.get('rank1'))} ({heldout.get('num_gallery')} identities)."
             + (f" ROC/DET: `{config['eval']['plots_dir']}/`." if config["eval"].get("plots_dir") else ""), "",
             "## Operating points (impostors of people in no View-2 fold)",
             f"- Verify: served threshold {meta.threshold:.3f} = false-match rate 1e-3 on the calibration impostors."]
    if curve is not None:
        schedule = dict((int(n), t) for n, t in curve.identify_schedule(0.01, IDENTIFY_SIZES, meta.threshold))
        lines.append("- Identify at 1% false-positive identification rate per search: threshold "
                     + ", ".join(f"{schedule[n]:.3f} at N = {n:,}" for n in IDENTIFY_SIZES) + ".")
    lines += ["", "## Privacy: learned attackers on this transform's features (`docs/attacks/README.md`)",
              "| attack | SFace rank-1 of rebuilds | PSNR | SSIM | run |", "|---|---|---|---|---|"]
    found = attack_figures(attacks, spec.name, spec.epsilon_per_coefficient)
    for key, name in ATTACK_NAMES.items():
        if key in found:
            a = found[key]
            psnr = "–" if a["psnr_db"] is None else f"{a['psnr_db']:.1f} dB"
            ssim = "–" if a["ssim"] is None else f"{a['ssim']:.2f}"
            lines.append(f"| {name} | {pct(a['rank1'])} | {psnr} | {ssim} | `{a['run']}` |")
        else:
            lines.append(f"| {name} | not measured | | | |")
    lines += ["Chance 0.12%, clean photos 98.2%. Attackers trained on training identities only, small CPU budgets: a "
              "stronger attacker (more data, GPU hours) does better; these are lower bounds on what leaks.", "",
              "## What the privacy claim covers, and what it does not",
              "- Covers: no server holds a photo, a template or a score in the clear (secret sharing, MPC; "
              "`docs/security.md`); the features carry the appearance only as far as the attacks above rebuild it.",
              "- Does NOT cover identity: whoever holds a matching model can recognise the person from the features "
              "(attack A3 regresses a pixel model's embedding from them; the server must be able to recognise). "
              "Nor a stronger inverter than the ones measured here.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model version directory (model.json)")
    parser.add_argument("--config", type=Path, required=True, help="the training config it came from")
    parser.add_argument("--attacks", type=Path, default=Path("docs/attacks/results.json"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    meta = ModelMetadata.load(args.model, verify=True)
    card = render(meta, load_config(args.config), json.loads(args.attacks.read_text()))
    args.out.write_text(card)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
