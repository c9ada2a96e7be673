#!/usr/bin/env bash
# Stage 6 on one GPU, as one prepared script (≤10 minutes on an H100/H200-class GPU):
#   1. GPT-2 124M training step: time, tokens/s, MFU and peak memory, bf16, with and without activation
#      checkpointing (benchmarks/gpt2_step.py; MFU against 989 TFLOP/s dense bf16 unless PEAK_TFLOPS is set),
#   2. shakespeare-gpt --preset gpu (nanoGPT's GPU configuration), capped at 5 minutes of training, recording
#      the val loss, tokens/s and the wall time.
# Usage (repository root, a CUDA machine; LLMLAB_DATA pointing at the data root with tinyshakespeare):
#   bash benchmarks/gpu_stage6.sh [OUT_DIR]
# Then copy the printed figures and OUT_DIR/shakespeare-gpt/result.json into docs/results.md.
set -euo pipefail
OUT="${1:-${OUT:-runs/gpu-stage6}}"
PEAK="${PEAK_TFLOPS:-989}"
mkdir -p "$OUT"
python -m pip install --quiet -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for extra in "" "--checkpointing"; do
  timeout 120 python benchmarks/gpt2_step.py --model gpt2 --device cuda --precision bf16 --batch 16 \
    --peak-tflops "$PEAK" $extra 2>&1 | tee -a "$OUT/gpt2_step.txt" || echo "gpt2_step $extra: stopped (see above)"
done
LLMLAB_PROGRESS=0 timeout 420 llmlab run shakespeare-gpt --preset gpu --device cuda --out "$OUT/shakespeare-gpt" \
  train.max_time_s=300 2>&1 | tee "$OUT/run.txt"
python - "$OUT/shakespeare-gpt/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["metrics"]
print(f"val loss {m['val/loss']:.4f} (target {r['target']['value']}: {'met' if r['target']['met'] else 'NOT met'}); "
      f"{r['steps']} steps, stop {r['stop_reason']}; wall {r['wall_time_s']:.0f} s; train {r['train_time_s']:.0f} s; "
      f"{r['throughput']['value']:.0f} {r['throughput']['unit']}; peak {r['peak_memory_mb']:.0f} MB on {r['hardware']['gpu']}")
PY
