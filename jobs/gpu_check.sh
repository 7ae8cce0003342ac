#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root (../shared/gpu/README.md):
#   bash jobs/gpu_check.sh            # with Ray's wheels in .whl/ when Ray is not installed there
#   BASE=.base bash jobs/gpu_check.sh # also the same benchmark with an earlier raylm, for an A/B in one run:
#                                     #   mkdir .base && git archive <commit> raylm jobs | tar -x -C .base
# Sized for a ~10-minute lease; each stage checks the time left (BUDGET_S, default 540 s) first.
# The small (~125M) model, bf16 + compile + fused AdamW, seq 1024, batch 64 in micro-batches of $MICRO (64:
# one per step, 2.0% faster than 32 on an H100), 50 steps; the single-process stages profile their last 3
# steps (the kernel table lands in the JSON). STAGES picks the stages and their order (default: all, so):
#  loss_head     jobs/bench_loss_head.py: the loss head alone, chunked against full logits, eager and
#                compiled (~1 min; with BASE, the same script with $BASE's raylm too)
#  base          with $BASE's raylm (only when BASE is given), chunked loss: an earlier commit's baseline
#  chunked       this raylm's defaults: chunked loss, fp32 residual stream: this run's baseline
#  residual_bf16 chunked loss, --residual_dtype bf16 (half the bytes in every residual add and norm input)
#  full_logits   --loss_chunking off with the faster residual stream (full logits were 3.0% faster than
#                the chunked loss on an H200, with the same kernel time)
#  tests         the GPU tests (CUDA + NCCL through Ray Train, bf16/fp16, compile, the bf16 residual
#                stream, flash and cuDNN attention)
#  ray           through Ray Train with the faster settings, next to the same loop in a plain process
#  max_autotune  --compile_mode max-autotune with the faster settings: inductor's Triton matmul templates
#                may take the elementwise work into their epilogues (a long compile)
#  tune_kernels  --compile_mode tune-kernels with the faster settings
# e.g. STAGES="chunked full_logits max_autotune" bash jobs/gpu_check.sh
# In the default order the last three rarely get their time: three ~130 s benchmarks and the tests come
# first. Name max_autotune early in STAGES to measure it.
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
rm -f "$WORK"/bench_* "$WORK"/loss_head_* "$WORK"/gpu_tests.log  # this run's results only
PROFILED="--launchers local --profile_steps 3 --micro_batch_size $MICRO"
fastest() {  # the faster of the stages measured so far: "<residual> <loss_chunking>"
  local best=chunked res=fp32 loss=on
  if [ "$(tps chunked)$(tps residual_bf16)$(tps full_logits)" = 000 ]; then  # nothing measured in this run:
    echo "--residual_dtype bf16 --loss_chunking off"; return; fi           # the fastest of the last lease
  for name in residual_bf16 full_logits; do [ "$(tps $name)" -gt "$(tps $best)" ] && best=$name; done
  [ "$best" = residual_bf16 ] && res=bf16
  [ "$best" = full_logits ] && res=$FULL_RES && loss=off
  echo "--residual_dtype $res --loss_chunking $loss"
}
FULL_RES=bf16
for stage in ${STAGES:-loss_head base chunked residual_bf16 full_logits tests ray max_autotune tune_kernels}; do
  case $stage in
    base) if [ -n "$BASE" ]; then
            if [ -d "$BASE/raylm" ]; then run base_chunked 130 "$BASE" $PROFILED --loss_chunking on
            else echo "== no baseline: BASE=$BASE has no raylm/ folder" | tee -a "$WORK/summary.txt"; fi
          fi ;;
    loss_head) for dir in ${BASE:+"$BASE"} .; do
                 if [ "$(left)" -lt 90 ]; then echo "== skipped loss_head in $dir: $(left) s left" | tee -a "$WORK/summary.txt"; continue; fi
                 echo "== loss_head in $dir ($(left) s left)" | tee -a "$WORK/summary.txt"
                 [ "$dir" = . ] || cp jobs/bench_loss_head.py "$dir/jobs/"  # an earlier raylm may predate it
                 (cd "$dir" && timeout -k 10 90 python3 jobs/bench_loss_head.py --use_gpu \
                    --out "$WORK/loss_head_$(basename "$(realpath "$dir")").json") 2>&1 \
                   | grep -E "^bench_loss_head|ms per|speed|Error|error" | tee -a "$WORK/summary.txt"
               done; pack ;;
    chunked) run chunked 130 . $PROFILED --loss_chunking on ;;
    residual_bf16) run residual_bf16 130 . $PROFILED --loss_chunking on --residual_dtype bf16 ;;
    full_logits) FULL_RES=bf16  # the bf16 stream, unless a residual_bf16 stage measured it slower
                 [ -f "$WORK/bench_residual_bf16.json" ] && [ "$(tps residual_bf16)" -le "$(tps chunked)" ] && FULL_RES=fp32
                 run full_logits 130 . $PROFILED --loss_chunking off --residual_dtype $FULL_RES ;;
    tests) if [ "$(left)" -gt 170 ]; then
             echo "== GPU tests ($(left) s left)" | tee -a "$WORK/summary.txt"
             timeout -k 10 170 python3 -m pytest -q -rf -p no:cacheprovider tests/test_gpu.py > "$WORK/gpu_tests.log" 2>&1
             grep -E "^(FAILED|ERROR)|passed|failed" "$WORK/gpu_tests.log" | tail -8 | tee -a "$WORK/summary.txt"; pack
           else echo "== skipped GPU tests: $(left) s left" | tee -a "$WORK/summary.txt"; fi
           python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1 ;;  # the tests' Ray frees the GPU
    ray) run ray 240 . --launchers local,ray --micro_batch_size $MICRO $(fastest)
         python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1 ;;  # nothing of a run cut short keeps the GPU
    max_autotune) run max_autotune 300 . $PROFILED $(fastest) --compile_mode max-autotune ;;
    tune_kernels) run tune_kernels 220 . $PROFILED $(fastest) --compile_mode tune-kernels ;;
    *) echo "== unknown stage $stage (loss_head base chunked residual_bf16 full_logits tests ray max_autotune" \
            "tune_kernels)" \
         | tee -a "$WORK/summary.txt" ;;
  esac
done
echo "== done in $(( $(date +%s) - START )) s" | tee -a "$WORK/summary.txt"; pack
