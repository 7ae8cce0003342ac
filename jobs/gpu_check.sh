#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root (../shared/gpu/README.md):
#   bash jobs/gpu_check.sh            # with Ray's wheels in .whl/ when Ray is not installed there
# Sized for a ~10-minute lease; each stage checks the time left (BUDGET_S, default 560 s) first.
# It measures what the last GPU session left open: whether inductor's kernel tuning closes the gap
# to 50% MFU that its fused elementwise kernels leave (README, Performance).
#  1. the small (~125M) model, bf16 + compile + fused AdamW + chunked loss, in a plain process, with
#     --compile_mode default and tune-kernels; each profiles its last 3 steps
#  2. the faster of the two through Ray Train (tokens/s, MFU, data wait)
#  3. if time is left: --compile_mode max-autotune, then the GPU tests (CUDA + NCCL through Ray Train,
#     bf16/fp16, compile, flash and cuDNN attention), then the attention kernels
# (Earlier sessions' stages, still runnable by hand: jobs/bench_memory.py --sizes xl for the memory
# estimate; --attention_backend cudnn and --loss_chunking off for the attention and loss-head rows.)
# Everything lands in $WORK; $OUT (or ./gpu_out) gets summary.txt and, after every stage, results.tar.gz
# of $WORK (logs, JSON with the profile tables), so a run cut short still returns what it measured.
set -uo pipefail
START=$(date +%s); BUDGET_S=${BUDGET_S:-560}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"; WORK=${WORK:-/tmp/gpu_work}; mkdir -p "$WORK"
pack() { tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/summary.txt"
python3 -c "import ray, torch; print('ray', ray.__version__, '| torch', torch.__version__, '| cuDNN', torch.backends.cudnn.version())" | tee -a "$WORK/summary.txt"

COMMON="--use_gpu --model_size small --vocab_size 32000 --seq_len 1024 --batch_size 64 --micro_batch_size ${MICRO:-32}
  --mixed_precision bf16 --compile_model --max_steps ${STEPS:-50} --log_interval 10 --cpus_per_worker 4 --loss_chunking on"
variant() {  # compile mode, seconds it may take: a plain-process run that profiles its last 3 steps
  local mode=$1 limit=$2
  if [ "$(left)" -lt "$limit" ]; then echo "== skipped --compile_mode $mode: $(left) s left"; return; fi
  echo "== plain process, --compile_mode $mode ($(left) s left)"
  timeout "$limit" python3 jobs/bench_train.py $COMMON --launchers local --profile_steps 3 --compile_mode "$mode" \
    --out "$WORK/bench_$mode.json" > "$WORK/bench_$mode.log" 2>&1
  grep -E "bench_train|local :|Profile of|  (matmul|attention|fused|optimizer|other) |Error|error" "$WORK/bench_$mode.log" \
    | tail -14 | tee -a "$WORK/summary.txt"; pack
}
fastest() {  # the --compile_mode of the fastest plain-process run so far
  python3 - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
from raylm.config import COMPILE_MODES
best, tps = "default", 0.0
for mode in COMPILE_MODES:
    f = Path(sys.argv[1]) / f"bench_{mode}.json"
    if f.exists():
        t = json.loads(f.read_text())["runs"]["local"]["tokens_per_sec"] or 0.0
        if t > tps:
            best, tps = mode, t
print(best)
EOF
}
rm -f "$WORK"/bench_*.json  # fastest() compares this run's results only
variant default 200
variant tune-kernels 220

BEST=$(fastest)
if [ "$(left)" -gt 120 ]; then
  echo "== Ray Train, --compile_mode $BEST ($(left) s left)"
  timeout $(( $(left) - 10 )) python3 jobs/bench_train.py $COMMON --launchers ray --compile_mode "$BEST" \
    --out "$WORK/bench_gpu.json" > "$WORK/bench_gpu.log" 2>&1
  grep -E "bench_train|ray   :|Error|error" "$WORK/bench_gpu.log" | grep -v Reporting | tail -8 \
    | tee -a "$WORK/summary.txt"; pack
fi
variant max-autotune 240
if [ "$(left)" -gt 150 ]; then
  echo "== GPU tests ($(left) s left)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$WORK/gpu_tests.log" 2>&1
  tail -6 "$WORK/gpu_tests.log" | tee -a "$WORK/summary.txt"; pack
fi
if [ "$(left)" -gt 60 ]; then
  echo "== attention kernels ($(left) s left)"
  timeout 60 python3 jobs/bench_attention.py --use_gpu --out "$WORK/attention.json" 2>&1 | tee -a "$WORK/summary.txt"
  pack
fi
echo "== done in $(( $(date +%s) - START )) s" | tee -a "$WORK/summary.txt"; cp "$WORK/summary.txt" "$OUT/"; pack
