"""Fine-tune a frequency-domain face model: learned inverse-DCT adapter + pretrained MobileFaceNet.

    python -m training_jobs.train --config training_jobs/configs/<experiment>.yaml [--resume] [--out-dir DIR]

Student: InverseDctAdapter(spec, learnable=True) (a 1x1 conv initialised to the exact inverse DCT) followed by
the pretrained MobileFaceNet; it sees the SDK's exact transform of an augmented face (fresh noise per sample).
Teacher: a frozen pixel-domain model on the same augmented clean face (pretrained MobileFaceNet, or SFace
through ONNX Runtime with a learned projection), or none.
Loss: identity_weight * margin loss (CosFace/ArcFace over the training identities) + distill_weight *
(1 - cos(student, teacher)) [+ loss.relation_weight * the batch-relation term, training_jobs/losses.py]
[+ loss.hint_weight * the stage-map term, training_jobs/hints.py];
`data.extra_faces` adds unlabelled faces that only the distillation terms see.
AdamW, linear warm-up then cosine decay (per step), fixed seeds, tqdm progress, a checkpoint after every
epoch (OUT/checkpoints/last.pt, resumed with --resume), a metrics JSON per epoch (OUT/metrics/epoch_NNN.json).
At the end: held-out evaluation (training_jobs.evaluate protocol) of the final model with the served noise,
and, when the config has an `export` section, an ONNX model version with model.json (inference.export).
Device: CUDA when available (config `device: auto`), else CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from inference.lfw import lfw_dir, shared_dir
from inference.mobilefacenet import EMBEDDING_DIM
from training_jobs.cached_views import TEACHER_INCLUDED, training_views
from training_jobs.datasets import Augment, MixedFaces, TransformedFaces, make_split, training_faces
from training_jobs.extra_batches import LabelledPlusExtraBatches
from training_jobs.eval_report import plot_roc_det
from training_jobs.evaluate import HeldoutSet, ModelResult, baseline, frequency_embedder, torch_features_fn
from training_jobs.hints import hint_loss_for, split_hints, student_outputs
from training_jobs.losses import DistillationLoss, MarginHead, relation_loss
from training_jobs.mixed_faces import mix_batch
from training_jobs.teacher import Teacher
from training_jobs.students import Student, build_student
from training_jobs.train_config import load_config, make_spec, pick_device, seed_everything

def set_train_mode(student: Student, freeze_bn: bool) -> None:
    student.train()
    if freeze_bn:
        for module in student.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


def student_embedding(student: Student, features: torch.Tensor) -> torch.Tensor:
    """Raw (un-normalised) embedding of one view, as the margin head and distillation see it."""
    result: torch.Tensor = student.backbone(student.adapter(features))
    return result


def lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Trainer:
    def __init__(self, config: dict[str, Any], out_dir: Path | None = None) -> None:
        self.config = config
        self.mixed_faces = float(config["loss"].get("mixed_faces", 0.0))  # checked by load_config
        self.relation_weight = float(config["loss"].get("relation_weight", 0.0))  # likewise
        self.out_dir = Path(out_dir or config["out_dir"] or Path("var/training") / config["name"])
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        seed_everything(config["seed"])
        self.device = pick_device(config["device"])
        self.shared = Path(config["shared_dir"] or shared_dir())
        self.lfw = lfw_dir(self.shared)
        self.spec = make_spec(config)
        data = config["data"]
        self.split = make_split(self.lfw, tuple(data["eval_folds"]), data["min_images"], data["max_identities"],
                                data["max_images_per_identity"])
        self.hint_weight = float(config["loss"].get("hint_weight", 0.0))  # checked by load_config
        self.teacher = Teacher(config["teacher"], self.shared, self.device, hints=bool(self.hint_weight))
        augment = Augment.from_config(config["augment"])
        self.dataset = training_views(self.lfw, self.split, self.spec, augment, config, self.teacher, self.out_dir) \
            if data.get("cached_views") else training_faces(self.lfw, self.split, self.spec, augment, config["seed"],
                                                            data.get("extra_faces", False))  # extra: distillation only
        self.student = build_student(config["model"], self.spec, self.shared).to(self.device)
        loss = config["loss"]
        head = loss["head"]
        self.head = MarginHead(EMBEDDING_DIM, self.split.num_classes, head["kind"], head["scale"],
                               head["margin"]).to(self.device)
        self.distill = DistillationLoss(EMBEDDING_DIM if config["teacher"] == "sface" else None).to(self.device)
        self.hints = hint_loss_for(self.student.backbone).to(self.device) if self.hint_weight else None
        optim = config["optim"]
        adapter = dict(self.student.adapter.named_parameters())
        fresh = [p for name, p in adapter.items() if name.startswith("context.")]  # new layers: their own lr
        groups = [{"params": [p for p in self.student.backbone.parameters()], "lr": optim["lr"]},
                  {"params": [p for p in self.head.parameters()] + list(self.distill.parameters())
                   + (list(self.hints.parameters()) if self.hints else []), "lr": optim["head_lr"]}]
        if fresh:
            groups.append({"params": fresh, "lr": optim.get("context_lr", optim["lr"])})
        adapter_params = [p for name, p in adapter.items() if p.requires_grad and not name.startswith("context.")]
        if adapter_params:
            groups.append({"params": adapter_params, "lr": optim["adapter_lr"], "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=optim["weight_decay"])
        per_epoch = len(self.batches(0)) if data["extra_per_batch"] else math.ceil(len(self.dataset) / optim["batch_size"])
        self.steps_per_epoch = per_epoch = min(per_epoch, int(optim["max_steps_per_epoch"] or per_epoch))
        total = per_epoch * optim["epochs"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, min(optim["warmup_steps"], max(1, total // 10)), optim["min_lr_ratio"]))
        self.epoch = 0  # epochs completed
        self.step = 0
        self.slim_copy: Path | None = None  # also write the checkpoint without optimizer state here
        self.deadline: float | None = None  # time.monotonic() by which training must end (see fit_to_deadline)
        self.history: list[dict[str, Any]] = []
        self._heldout: dict[int | None, HeldoutSet] = {}

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"epoch": self.epoch, "step": self.step, "config": self.config,
                 "student": self.student.state_dict(), "head": self.head.state_dict(),
                 "distill": self.distill.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "hints": self.hints.state_dict() if self.hints else None,
                 "scheduler": self.scheduler.state_dict(), "history": self.history,
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                 "transform": self.spec.to_dict()}
        atomic_save(state, path)  # a crash mid-save leaves the previous checkpoint
        if self.config.get("keep_every_epoch"):
            torch.save(state, path.parent / f"epoch_{self.epoch:03d}.pt")
        if self.slim_copy is not None:
            atomic_save({k: v for k, v in state.items() if k != "optimizer"}, self.slim_copy)
        return path

    def load_checkpoint(self, path: Path | None = None) -> None:
        state = torch.load(path or self.checkpoint_path, map_location=self.device, weights_only=False)
        if state["transform"] != self.spec.to_dict():
            raise ValueError("the checkpoint was trained with another transform")
        self.student.load_state_dict(state["student"])
        self.head.load_state_dict(state["head"])
        self.distill.load_state_dict(state["distill"])
        if (self.hints is None) != (state.get("hints") is None):
            raise ValueError("the checkpoint was trained " + ("without" if self.hints else "with") + " loss.hint_weight")
        if self.hints is not None:
            self.hints.load_state_dict(state["hints"])
        if "optimizer" in state:  # a slim checkpoint (--slim-copy) restarts AdamW's moments from zero
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    # -- training ----------------------------------------------------------------------------------
    def loader(self, epoch: int) -> DataLoader[tuple[torch.Tensor, torch.Tensor, int]]:
        self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(self.config["seed"] * 100_003 + epoch)
        workers = int(self.config["data"]["num_workers"])
        if self.config["data"]["extra_per_batch"]:
            return DataLoader(self.dataset, batch_sampler=self.batches(epoch), num_workers=workers,
                              persistent_workers=False, pin_memory=self.device.type == "cuda")
        return DataLoader(self.dataset, batch_size=self.config["optim"]["batch_size"], shuffle=True, drop_last=False,
                          generator=generator, num_workers=workers, persistent_workers=False,
                          pin_memory=self.device.type == "cuda")

    def batches(self, epoch: int) -> LabelledPlusExtraBatches:
        """One shuffled pass over the labelled images, as in a plain run's epoch, plus data.extra_per_batch extra faces."""
        assert isinstance(self.dataset, MixedFaces)
        labelled, extras = self.dataset.cumulative_sizes[0], len(self.dataset) - self.dataset.cumulative_sizes[0]
        return LabelledPlusExtraBatches(labelled, extras, self.config["optim"]["batch_size"],
                                        self.config["data"]["extra_per_batch"], self.config["seed"] * 100_003 + epoch)

    @torch.no_grad()
    def init_head(self) -> None:
        """Class centres from the teacher's (or the initial student's) embeddings of the un-augmented faces."""
        if self.config["loss"]["head"].get("init") != "teacher_means" or self.config["loss"]["identity_weight"] == 0:
            return
        plain = TransformedFaces(self.lfw, self.split.train_images, self.split.train_labels, self.spec, None,
                                 seed=self.config["seed"] + 1)
        loader = DataLoader(plain, batch_size=self.config["optim"]["batch_size"], shuffle=False,
                            num_workers=int(self.config["data"]["num_workers"]))
        self.student.eval()
        embeddings, labels = [], []
        for features, clean, label in loader:
            teacher = self.teacher(clean) if self.config["teacher"] == "mobilefacenet" else None
            embeddings.append(teacher if teacher is not None else student_embedding(self.student, features.to(self.device)))
            labels.append(label.to(self.device))
        self.head.init_from_embeddings(torch.cat(embeddings), torch.cat(labels))

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm import tqdm

        loss_cfg = self.config["loss"]
        set_train_mode(self.student, self.config["model"]["freeze_backbone_bn"])
        sums = {"loss": 0.0, "identity": 0.0, "distill": 0.0, "relation": 0.0, "hint": 0.0, "train_acc": 0.0}
        count = labelled = 0
        start = time.perf_counter()
        bar = tqdm(self.loader(epoch), total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config['optim']['epochs']}",
                   unit="step", dynamic_ncols=True)
        for index, (features, clean, labels) in enumerate(bar):
            if index >= self.steps_per_epoch:
                break
            if self.mixed_faces:
                features, clean, labels = mix_batch(features, clean, labels, self.spec, self.mixed_faces,
                                                    np.random.default_rng([self.config["seed"], epoch, index]))
            features, labels = features.to(self.device, non_blocking=True), labels.to(self.device)
            maps, clean = split_hints(clean)  # the teacher's maps when the cached views hold them
            teacher = clean.to(self.device) if getattr(self.dataset, TEACHER_INCLUDED, False) else self.teacher(clean)
            embedding, hint = student_outputs(self.student, features, maps, self.hints)
            identity, cos = self.head(embedding, labels) if loss_cfg["identity_weight"] else (embedding.new_zeros(()), None)
            distill = self.distill(embedding, teacher) if teacher is not None and loss_cfg["distill_weight"] \
                else embedding.new_zeros(())
            relation = relation_loss(embedding, teacher) if teacher is not None and self.relation_weight \
                else embedding.new_zeros(())
            loss = loss_cfg["identity_weight"] * identity + loss_cfg["distill_weight"] * distill \
                + self.relation_weight * relation + self.hint_weight * hint
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config["optim"]["grad_clip"]:
                nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                         self.config["optim"]["grad_clip"])
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            n = len(labels)
            count += n
            labelled += int((labels >= 0).sum())
            sums["loss"] += loss.item() * n
            sums["identity"] += identity.item() * n
            sums["distill"] += distill.item() * n
            sums["relation"] += relation.item() * n
            sums["hint"] += hint.item() * n
            if cos is not None:
                sums["train_acc"] += float((cos.argmax(1) == labels).float().sum())
            bar.set_postfix(loss=f"{loss.item():.4f}", id=f"{identity.item():.3f}", kd=f"{distill.item():.4f}")
        bar.close()
        metrics: dict[str, float | list[float]] = {key: value / max(count, 1) for key, value in sums.items()}
        metrics["train_acc"] = sums["train_acc"] / max(labelled, 1)  # of the labelled samples only
        metrics.update({"epoch": epoch + 1, "step": self.step, "samples": count,
                        "lr": [g["lr"] for g in self.optimizer.param_groups], "seconds": time.perf_counter() - start})
        return metrics

    def heldout(self, pairs_per_fold: int | None) -> HeldoutSet:
        if pairs_per_fold not in self._heldout:
            self._heldout[pairs_per_fold] = HeldoutSet(self.lfw, self.split.eval_folds, pairs_per_fold)
        return self._heldout[pairs_per_fold]

    def evaluate(self, pairs_per_fold: int | None, name: str) -> ModelResult:
        self.student.eval()
        rng = np.random.default_rng(self.config["eval"]["seed"])
        embed = frequency_embedder(torch_features_fn(self.student), self.spec, rng)
        return self.heldout(pairs_per_fold).evaluate(name, self.spec.transform_id, embed)

    def fit(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train up to the configured epochs (or only until `stop_after` epochs are done, as if interrupted)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(self.config, indent=1) + "\n")
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
            print(f"resumed from {self.checkpoint_path} after epoch {self.epoch} (step {self.step})", flush=True)
        elif self.epoch == 0:
            self.init_head()
            quick = self.config["eval"]["epoch_pairs_per_fold"]
            if quick:
                self.history.append({"epoch": 0, "heldout": baseline(lambda: self.evaluate(quick, "epoch 0"))})
                self._write_metrics(self.history[-1])

        def planned() -> int:  # re-read every epoch: fit_to_deadline may lower it
            configured = int(self.config["optim"]["epochs"])
            return configured if stop_after is None else min(stop_after, configured)

        while self.epoch < planned():
            metrics = self.train_epoch(self.epoch)
            quick = self.config["eval"]["epoch_pairs_per_fold"]
            if quick:
                metrics["heldout"] = self.evaluate(quick, f"epoch {self.epoch + 1}").to_dict()
            self.epoch += 1
            self.history.append(metrics)
            self._write_metrics(metrics)
            self.fit_to_deadline(metrics["seconds"])
            self.save_checkpoint()
            acc = metrics.get("heldout", {}).get("verification", {}).get("accuracy")
            print(f"epoch {self.epoch}: loss {metrics['loss']:.4f} (identity {metrics['identity']:.4f}, "
                  f"distill {metrics['distill']:.4f})" + (f", held-out acc {100 * acc:.2f}%" if acc is not None else ""),
                  flush=True)
        return self.history[-1] if self.history else {}

    def fit_to_deadline(self, epoch_seconds: float) -> None:
        """Lower the epoch count so that training ends by the deadline, and compress the cosine schedule to match.

        Why: a lent accelerator comes for a fixed number of minutes; a run cut off mid-schedule ends at a high
        learning rate, while a shorter complete schedule ends annealed. Called after the first epoch is timed."""
        if self.deadline is None or epoch_seconds <= 0:
            return
        optim = self.config["optim"]
        left = max(0.0, self.deadline - time.monotonic())
        epochs = min(int(optim["epochs"]), self.epoch + int(left // (epoch_seconds * 1.05)))
        epochs = max(epochs, self.epoch)
        if epochs == optim["epochs"]:
            return
        print(f"deadline: {epochs} epochs instead of {optim['epochs']} ({epoch_seconds:.1f} s per epoch)", flush=True)
        optim["epochs"] = epochs
        total = self.steps_per_epoch * max(epochs, 1)
        factor = lr_lambda(total, min(optim["warmup_steps"], max(1, total // 10)), optim["min_lr_ratio"])
        self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)

    def _write_metrics(self, metrics: dict[str, Any]) -> None:
        directory = self.out_dir / "metrics"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"epoch_{metrics['epoch']:03d}.json").write_text(json.dumps(metrics, indent=1) + "\n")

    def finish(self) -> dict[str, Any]:
        """Full held-out evaluation, plots, and the optional ONNX export of the final model."""
        eval_cfg = self.config["eval"]
        result = self.evaluate(eval_cfg["final_pairs_per_fold"], self.config["name"])
        report = {"name": self.config["name"], "epochs": self.epoch, "steps": self.step,
                  "train_images": len(self.split.train_images), "train_identities": self.split.num_classes,
                  "eval_folds": list(self.split.eval_folds), "final": result.to_dict()}
        plots_dir = Path(eval_cfg["plots_dir"]) if eval_cfg.get("plots_dir") else self.out_dir / "eval"
        report["plots"] = [str(p) for p in plot_roc_det([result], plots_dir, f"{self.config['name']}, folds "
                                                        f"{self.split.eval_folds[0]}-{self.split.eval_folds[-1]}")]
        export = self.config.get("export")
        if export:
            from inference.export import export_model_version
            metrics = {"protocol": "training_jobs.evaluate: LFW folds " + ",".join(map(str, self.split.eval_folds))
                       + " (identities never trained on), served noise, leave-one-fold-out accuracy; the served "
                       "threshold is NOT chosen on these pairs (inference.export.VERIFY_FAR on calibration impostors)",
                       "heldout": result.to_dict(),
                       "training": {k: report[k] for k in ("epochs", "steps", "train_images", "train_identities")}}
            unseen = Path(export["calibration_faces"]) if export.get("calibration_faces") else None
            final = export_model_version(copy.deepcopy(self.student).cpu(), self.spec, export["version"],
                                         Path(export["out_dir"]), self.shared, None, metrics, calibration_faces=unseen)
            report["exported"] = str(final)
        (self.out_dir / "final.json").write_text(json.dumps(report, indent=1) + "\n")
        return report


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file and a rename, so a reader never sees half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--no-final", action="store_true", help="skip the final evaluation and export")
    parser.add_argument("--finish-only", action="store_true",
                        help="no training: load OUT/checkpoints/last.pt, then the final evaluation and export")
    parser.add_argument("--slim-copy", type=Path, default=None,
                        help="after every epoch also write the checkpoint without optimizer state here (~1/3 size)")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="fit the run into this many minutes: fewer epochs, the same full cosine schedule")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    trainer = Trainer(config, args.out_dir)
    trainer.slim_copy = args.slim_copy
    if args.deadline_minutes is not None:
        trainer.deadline = time.monotonic() + 60 * args.deadline_minutes
    print(f"{config['name']}: {len(trainer.dataset)} training images of {trainer.split.num_classes} identities "
          f"(eval folds {trainer.split.eval_folds}), transform {trainer.spec.transform_id}, device {trainer.device}, "
          f"{trainer.steps_per_epoch} steps/epoch", flush=True)
    if args.finish_only:
        trainer.load_checkpoint()
    else:
        trainer.fit(resume=args.resume)
    if not args.no_final:
        report = trainer.finish()
        print(json.dumps(report["final"], indent=1))


if __name__ == "__main__":
    main()
