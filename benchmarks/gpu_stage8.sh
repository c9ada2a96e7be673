#!/usr/bin/env bash
# Stage 8 on the GPUs present, as one prepared script (≤10 minutes): gpt-tp --preset default (GPT-2 small,
# 124M, context 1024, GPT-2 BPE padded to 50,304, bf16, batches of 32 windows = 32,768 tokens) for 200 steps:
#   1. TP over all GPUs when there are 2 or 4 (12 heads allow TP 1, 2, 4; 8 GPUs: TP 4 × DP 2), else TP 1;
#   2. with more than one GPU, the same steps as pure data parallelism (TP 1 × DP N) for comparison;
#   3. PyTorch's DTensor engine in the layout of 1 (the same recipe on torch's own tensor parallelism).
# Each run logs tokens/s, MFU (datasheet peak of the GPU, llmlab/train/flops.py) and the communication share;
# the table at the end is benchmarks/tp_scaling.py's. Needs TinyShakespeare and GPT-2's tokenizer files under
# the data root (LLMLAB_DATA: tinyshakespeare/input.txt and tokenizers/gpt2/tokenizer.json).
# Usage (repository root, a CUDA machine): bash benchmarks/gpu_stage8.sh [OUT_DIR]
# Then copy the table into docs/results.md (Stage 8, GPU).
set -uo pipefail
OUT="${1:-${OUT:-runs/gpu-stage8}}"
mkdir -p "$OUT"
python -m pip install --quiet -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
TP=1
if [ $((NGPU % 4)) -eq 0 ]; then TP=4; elif [ $((NGPU % 2)) -eq 0 ]; then TP=2; fi
COMMON=(--preset default --device cuda train.max_steps=200 train.eval_every=100 train.checkpoint_every=-1
        train.log_every=10 samples.count=0 data.eval_batches=4)
run() {  # NAME TIMEOUT ARGS...
  timeout "$2" torchrun --standalone --nproc_per_node "$NGPU" -m llmlab run gpt-tp "${COMMON[@]}" "${@:3}" \
    --out "$OUT/$1" 2>&1 | tail -n 25 | tee "$OUT/$1.log" || echo "stopped: $1" | tee -a "$OUT/$1.log"
}
run "tp$TP" 180 "parallel.tp=$TP"
if [ "$NGPU" -gt 1 ] && [ "$TP" -gt 1 ]; then run "dp$NGPU" 150 parallel.tp=1; fi
run "dtensor-tp$TP" 150 "parallel.tp=$TP" parallel.engine=dtensor
python benchmarks/tp_scaling.py --summarize "$OUT"/*/ | tee "$OUT/table.md"
