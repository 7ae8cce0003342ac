#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root (../shared/gpu/README.md):
#   bash jobs/gpu_check.sh            # with Ray's wheels in .whl/ when Ray is not installed there
# Sized for a ~10-minute lease; each stage checks the time left (BUDGET_S, default 560 s) first.
#  1. the attention kernels on the small model's shapes (jobs/bench_attention.py)
#  2. the small (~125M) model, bf16 + compile + fused AdamW, in a plain process, three ways:
#     PyTorch's attention choice with full logits (the earlier figure's setting), cuDNN attention
#     preferred, and cuDNN with the chunked loss head; each profiles its last 3 steps
#  3. the GPU tests (CUDA + NCCL through Ray Train, bf16/fp16, compile, flash and cuDNN attention)
#  4. the fastest of the three settings through Ray Train and in a plain process, in one run:
#     tokens/s, MFU and the Ray overhead
#  5. if time is left: the xl model's memory on one GPU with and without activation checkpointing
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

echo "== 1. attention kernels ($(left) s left)"
timeout 60 python3 jobs/bench_attention.py --use_gpu --out "$WORK/attention.json" 2>&1 | tee -a "$WORK/summary.txt"; pack

COMMON="--use_gpu --model_size small --vocab_size 32000 --seq_len 1024 --batch_size 64 --micro_batch_size ${MICRO:-32}
  --mixed_precision bf16 --compile_model --max_steps ${STEPS:-50} --log_interval 10 --cpus_per_worker 4"
variant() {  # name, seconds it may take, extra flags
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt "$limit" ]; then echo "== skipped $name: $(left) s left"; return; fi
  echo "== 2. $name ($(left) s left)"
  timeout "$limit" python3 jobs/bench_train.py $COMMON --launchers local --profile_steps 3 "$@" \
    --out "$WORK/bench_$name.json" > "$WORK/bench_$name.log" 2>&1
  grep -E "bench_train|local :|Profile of|  (matmul|attention|fused|optimizer|other) |Error|error" "$WORK/bench_$name.log" \
    | tail -14 | tee -a "$WORK/summary.txt"; pack
}
variant auto 200 --loss_chunking off
variant cudnn 150 --attention_backend cudnn --loss_chunking off
variant cudnn_chunked 150 --attention_backend cudnn --loss_chunking on

if [ "$(left)" -gt 200 ]; then
  echo "== 3. GPU tests ($(left) s left)"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$WORK/gpu_tests.log" 2>&1
  tail -6 "$WORK/gpu_tests.log" | tee -a "$WORK/summary.txt"; pack
fi

BEST=$(python3 - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
flags = {"auto": "--loss_chunking off", "cudnn": "--attention_backend cudnn --loss_chunking off",
         "cudnn_chunked": "--attention_backend cudnn --loss_chunking on"}
best, tps = "auto", 0.0
for name in flags:
    f = Path(sys.argv[1]) / f"bench_{name}.json"
    if f.exists():
        t = json.loads(f.read_text())["runs"]["local"]["tokens_per_sec"] or 0.0
        if t > tps:
            best, tps = name, t
print(flags[best])
EOF
)
if [ "$(left)" -gt 150 ]; then
  echo "== 4. Ray Train and plain, flags: '${BEST}' ($(left) s left)"
  timeout $(( $(left) - 20 )) python3 jobs/bench_train.py $COMMON --launchers local,ray $BEST \
    --out "$WORK/bench_gpu.json" > "$WORK/bench_gpu.log" 2>&1
  grep -E "bench_train|local :|ray   :|Ray Train /|Error|error" "$WORK/bench_gpu.log" | grep -v Reporting | tail -8 \
    | tee -a "$WORK/summary.txt"; pack
fi
if [ "$(left)" -gt 60 ]; then
  echo "== 5. xl memory ($(left) s left)"
  timeout $(( $(left) - 10 )) python3 jobs/bench_memory.py --sizes xl --max_micro_batch 8 --out "$WORK/memory_xl.json" \
    > "$WORK/memory_xl.log" 2>&1; tail -6 "$WORK/memory_xl.log" | tee -a "$WORK/summary.txt"; pack
fi
echo "== done in $(( $(date +%s) - START )) s" | tee -a "$WORK/summary.txt"; cp "$WORK/summary.txt" "$OUT/"; pack
