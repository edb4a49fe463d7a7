#!/usr/bin/env bash
# Train the four preset models side by side on a lent accelerator (see training_jobs/configs/gpu-*.yaml).
# Before the call, here:  python -m training_jobs.pack_shared --out gpu_pack/shared
#                         tar -czf gpu_pack/shared.tar.gz -C gpu_pack shared  (carry: gpu_pack/shared.tar.gz)
# On the device:          MINUTES=7 bash scripts/gpu_train.sh
# Writes to $OUT: <preset>.pt (slim checkpoint after every epoch) and <preset>.log, nothing else (8 files).
set -u
OUT=${OUT:-/tmp/gpu-out}
MINUTES=${MINUTES:-7}
RUNS=${RUNS:-"v0 low10 low15 low21"}
PY=${PY:-python3}
mkdir -p "$OUT" /tmp/pack
tar -xzf gpu_pack/shared.tar.gz -C /tmp/pack || exit 1
export PRIVFACE_SHARED_DIR=/tmp/pack/shared PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for run in $RUNS; do
  "$PY" -m training_jobs.train --config "training_jobs/configs/gpu-$run.yaml" --out-dir "/tmp/train/$run" \
    --no-final --slim-copy "$OUT/$run.pt" --deadline-minutes "$MINUTES" > "$OUT/$run.log" 2>&1 &
done
wait
for run in $RUNS; do echo "== $run"; grep -E "^(epoch|deadline|gpu-)|Error|error" "$OUT/$run.log" | tail -n 8; done
ls -la "$OUT"
