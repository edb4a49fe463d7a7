"""Fold-1 accuracy of model v0 at several noise levels: the measurement behind the default ε.

    python -m training_jobs.noise_sweep [--preset dct8-v0] [--epsilons none,512,256,128,64,32] [--max-pairs 600] [--seed 0]

Prints a markdown table (ε per coefficient, Laplace scale in units of the channel std, ε per image,
accuracy) for docs/models/<version>.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from inference.evaluation import verify_fold
from inference.frequency_model import build_model_v0
from inference.lfw import lfw_dir, shared_dir
from inference.transform import PRESETS


def torch_embedder(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a model as a numpy features -> embeddings function."""
    def embed(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result: np.ndarray = model(torch.from_numpy(features)).numpy()
            return result
    return embed


def parse_epsilons(text: str) -> list[float | None]:
    return [None if item.strip().lower() == "none" else float(item) for item in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dct8-v0", choices=sorted(PRESETS))
    parser.add_argument("--epsilons", default="none,512,256,128,64,32")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--max-pairs", type=int, default=None)
    parser.add_argument("--shared-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="noise seed (the same draws, rescaled, for every ε)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shared = args.shared_dir or shared_dir()
    base = PRESETS[args.preset](None)
    embed = torch_embedder(build_model_v0(base, shared))
    print("| ε per coefficient | Laplace b / σ | ε per image | fold accuracy | threshold |")
    print("|---|---|---|---|---|")
    for epsilon in parse_epsilons(args.epsilons):
        spec = base.with_epsilon(epsilon)
        start = time.perf_counter()
        result = verify_fold(lfw_dir(shared), args.fold, spec, embed, args.max_pairs, args.seed)
        ratio = "0" if epsilon is None else f"{2 * spec.clip_sigmas / epsilon:.3g}"
        print(f"| {epsilon} | {ratio} | {spec.epsilon_per_image:.4g} | {100 * result.accuracy:.2f}% "
              f"± {100 * result.accuracy_std:.2f} | {result.threshold:.3f} |  ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
