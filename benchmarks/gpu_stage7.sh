#!/usr/bin/env bash
# Stage 7 on one GPU, as one prepared script (≤10 minutes on an H100/H200-class GPU): fine-tuning steps of our
# LLaMA with random weights (nothing to download; speed and memory do not depend on the values),
# benchmarks/qlora_step.py, bf16, LoRA r 64 on every linear layer, activation checkpointing:
#   1. Llama-2-7B: QLoRA (NF4 base, double quantization), LoRA on a bf16 base, full fine-tuning (AdamW);
#   2. the largest that fits one 80-141 GB GPU with QLoRA: Llama-2-70B (NF4 base ~35 GB), batch 1.
# Each line: step time, tokens/s, peak CUDA memory, weight GiB, trainable parameters (JSON).
# Usage (repository root, a CUDA machine): bash benchmarks/gpu_stage7.sh [OUT_DIR]
# Then copy OUT_DIR/qlora_step.jsonl into docs/results.md (Stage 7, GPU).
set -uo pipefail
OUT="${1:-${OUT:-runs/gpu-stage7}}"
mkdir -p "$OUT"
python -m pip install --quiet -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run() { timeout "$1" python benchmarks/qlora_step.py "${@:2}" --checkpointing 2>&1 | tee -a "$OUT/qlora_step.jsonl" \
  || echo "{\"stopped\": \"${*:2}\"}" | tee -a "$OUT/qlora_step.jsonl"; }
run 150 --model llama2-7b --method qlora --r 64 --batch 4 --seq 512
run 120 --model llama2-7b --method lora --r 64 --batch 4 --seq 512
run 120 --model llama2-7b --method full --batch 4 --seq 512
run 200 --model llama2-70b --method qlora --r 64 --batch 1 --seq 512 --steps 3 --warmup 1
