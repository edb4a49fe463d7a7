"""Learned attackers against the transform's features (issue 10, item 1).

The naive inverse-DCT rebuilds of `training_jobs.leakage` under-state the leak: a network trained on public
faces learns to fill in what the transform removed. Privacy is therefore judged by these attackers, each trained
on training identities only (never an identity of LFW folds 6-10) for the same wall-clock budget, and scored on
folds 6-10:

- `a1_inverter`: a small CNN from the (noisy) feature planes to the 112x112 face, L1 (+ optional SSIM) loss;
- `a2_identity`: A1 plus an identity loss through the pixel MobileFaceNet and a refinement CNN;
- `a3_embedding`: a regressor from the features to the pixel MobileFaceNet embedding (succeeds by design);
- `data`: the attacker's training split (asserted disjoint from folds 6-10) and the held-out probe set;
- `training`: the shared wall-clock-budgeted, resumable training loop;
- `evaluation`: PSNR, SSIM, SFace rank-1, TAR@FAR of reconstructions, the image grid, the results JSON/table;
- `cli`: `python -m training_jobs.attacks run|table ...`.
"""
