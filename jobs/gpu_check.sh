#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root (../shared/gpu/README.md):
#   bash jobs/gpu_check.sh            # with Ray's wheels in .whl/ when Ray is not installed there
#   BASE=.base bash jobs/gpu_check.sh # also the same benchmark with an earlier raylm, for an A/B in one run:
#                                     #   mkdir .base && git archive <commit> raylm jobs | tar -x -C .base
# Sized for a ~10-minute lease; each stage checks the time left (BUDGET_S, default 540 s) first.
# The small (~125M) model, bf16 + compile + fused AdamW, seq 1024, batch 64 in micro-batches of $MICRO (64:
# one per step, 2.0% faster than 32 on an H100), 50 steps; the single-process stages profile their last 3
# steps (the kernel table lands in the JSON):
#  1. with $BASE's raylm (if given), chunked loss: an earlier commit's baseline
#  2. this raylm, chunked loss, fp32 residual stream (the default): this run's baseline
#  3. this raylm, chunked loss, --residual_dtype bf16: half the bytes in every residual add and norm input
#  4. the GPU tests (CUDA + NCCL through Ray Train, bf16/fp16, compile, the bf16 residual stream, flash and
#     cuDNN attention)
#  5. full logits (--loss_chunking off) with the faster residual stream: whether chunking still pays now
#     that compiled code builds its gradients out of place (raylm/model.py)
#  6. through Ray Train with the faster settings, next to the same loop in a plain process
#  7. if time is left: --compile_mode tune-kernels, with the faster settings
# Everything lands in $WORK; $OUT (or ./gpu_out) gets summary.txt and, after every stage, results.tar.gz
# of $WORK (logs, JSON with the profile tables), so a run cut short still returns what it measured.
set -uo pipefail
START=$(date +%s); BUDGET_S=${BUDGET_S:-540}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
OUT=$(realpath -m "${OUT:-./gpu_out}"); WORK=$(realpath -m "${WORK:-/tmp/gpu_work}"); BASE=${BASE:-}
mkdir -p "$OUT" "$WORK"
pack() { cp "$WORK/summary.txt" "$OUT/summary.txt"
         tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/summary.txt"
python3 -c "import ray, torch; print('ray', ray.__version__, '| torch', torch.__version__, '| cuDNN', torch.backends.cudnn.version())" | tee -a "$WORK/summary.txt"

COMMON=${COMMON:-"--use_gpu --model_size small --vocab_size 32000 --seq_len 1024 --batch_size 64
  --mixed_precision bf16 --compile_model --max_steps ${STEPS:-50} --log_interval 10 --cpus_per_worker 4"}
MICRO=${MICRO:-64}
run() {  # name, seconds it may take, directory, then bench_train arguments
  local name=$1 limit=$2 dir=$3; shift 3
  if [ "$(left)" -lt "$limit" ]; then echo "== skipped $name: $(left) s left" | tee -a "$WORK/summary.txt"; return; fi
  echo "== $name ($(left) s left)" | tee -a "$WORK/summary.txt"
  (cd "$dir" && timeout -k 10 "$limit" python3 jobs/bench_train.py $COMMON "$@" --out "$WORK/bench_$name.json") \
    > "$WORK/bench_$name.log" 2>&1
  { sed -n '/^bench_train: .*, model /,$p' "$WORK/bench_$name.log" | grep -v '^=*$'
    grep -E "Error|error" "$WORK/bench_$name.log" | grep -v Reporting | tail -3; } | tee -a "$WORK/summary.txt"; pack
}
tps() {  # the local run's tokens/s in bench_<name>.json, 0 when missing
  python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['runs']['local']['tokens_per_sec'] or 0))" \
    "$WORK/bench_$1.json" 2>/dev/null || echo 0
}
rm -f "$WORK"/bench_* "$WORK"/gpu_tests.log  # this run's results only
PROFILED="--launchers local --profile_steps 3 --micro_batch_size $MICRO"
if [ -n "$BASE" ]; then
  if [ -d "$BASE/raylm" ]; then run base_chunked 130 "$BASE" $PROFILED --loss_chunking on
  else echo "== no baseline: BASE=$BASE has no raylm/ folder" | tee -a "$WORK/summary.txt"; fi
fi
run chunked 130 . $PROFILED --loss_chunking on
run residual_bf16 130 . $PROFILED --loss_chunking on --residual_dtype bf16
RES=fp32; [ "$(tps residual_bf16)" -gt "$(tps chunked)" ] && RES=bf16
if [ "$(left)" -gt 170 ]; then
  echo "== GPU tests ($(left) s left)" | tee -a "$WORK/summary.txt"
  timeout -k 10 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$WORK/gpu_tests.log" 2>&1
  tail -6 "$WORK/gpu_tests.log" | tee -a "$WORK/summary.txt"; pack
fi
python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1  # the tests' Ray frees the GPU
run full_logits 130 . $PROFILED --loss_chunking off --residual_dtype $RES
LOSS=on; [ "$(tps full_logits)" -gt "$(tps residual_$RES)" ] && [ "$(tps full_logits)" -gt "$(tps chunked)" ] && LOSS=off
run ray 240 . --launchers local,ray --micro_batch_size $MICRO --loss_chunking $LOSS --residual_dtype $RES
python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1  # nothing of a run cut short keeps the GPU
run tune_kernels 220 . $PROFILED --loss_chunking $LOSS --residual_dtype $RES --compile_mode tune-kernels
echo "== done in $(( $(date +%s) - START )) s" | tee -a "$WORK/summary.txt"; pack
