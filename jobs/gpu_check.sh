#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root (../shared/gpu/README.md):
#   bash jobs/gpu_check.sh            # with Ray's wheels in .whl/ when Ray is not installed there
# Runs the GPU tests (CUDA + NCCL through Ray Train, bf16/fp16, compile, flash attention), then
# the training benchmark: the small (~125M) model, bf16 + compile + fused AdamW + flash attention,
# through Ray Train and in a plain process. Figures land in $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import ray, torch; print('ray', ray.__version__, '| torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
python3 jobs/bench_train.py --use_gpu --model_size small --vocab_size 32000 --seq_len 1024 --batch_size 64 \
  --micro_batch_size ${MICRO:-32} --mixed_precision bf16 --compile_model --max_steps ${STEPS:-60} --log_interval 10 \
  --cpus_per_worker 4 --out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
grep -E "Step [0-9]+/|bench_train|peak|tokens/s|Ray Train /|Error|error" "$OUT/bench_gpu.log" | grep -v Reporting | tail -30
# the chunked loss head on the GPU (auto keeps it off there until this is measured): one plain run
python3 jobs/bench_train.py --use_gpu --model_size small --vocab_size 32000 --seq_len 1024 --batch_size 64 \
  --micro_batch_size ${MICRO:-32} --mixed_precision bf16 --compile_model --max_steps ${STEPS:-60} --log_interval 10 \
  --cpus_per_worker 4 --launchers local --loss_chunking on --out "$OUT/bench_gpu_chunked.json" \
  > "$OUT/bench_gpu_chunked.log" 2>&1
grep -E "bench_train|peak|tokens/s|MFU|Error|error" "$OUT/bench_gpu_chunked.log" | grep -v Reporting | tail -10
