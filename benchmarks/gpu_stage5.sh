#!/usr/bin/env bash
# Stage 5 on one GPU, as one prepared script (≤10 minutes on an H100/H200-class GPU):
#   1. the cost of attention on CUDA (time and memory vs n, naive vs fused, bf16),
#   2. step time ours vs torch.nn.Transformer at the base model's size (fp32 weights and math),
#   3. multi30k-transformer's default preset (base model, bf16, noam), capped at 7 minutes of training,
#      recording greedy and beam BLEU and the wall time.
# Usage (repository root, a CUDA machine; LLMLAB_DATA pointing at the data root with multi30k/raw):
#   bash benchmarks/gpu_stage5.sh [OUT_DIR]
# Then copy the printed figures and OUT_DIR/multi30k-transformer/result.json into docs/results.md.
set -euo pipefail
OUT="${1:-${OUT:-runs/gpu-stage5}}"
mkdir -p "$OUT"
python -m pip install --quiet -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 120 python benchmarks/attention_cost.py --device cuda --dtype bf16 --batch 8 --max-len 8192 \
  --out "$OUT/attention" 2>&1 | tee "$OUT/attention_cost.txt" || echo "attention_cost: stopped (see above)"
timeout 90 python benchmarks/transformer_step.py --device cuda --d-model 512 --heads 8 --layers 6 --d-ff 2048 \
  --tokens 8192 2>&1 | tee "$OUT/step_time.txt" || echo "transformer_step: stopped (see above)"
LLMLAB_PROGRESS=0 timeout 540 llmlab run multi30k-transformer --device cuda --out "$OUT/multi30k-transformer" \
  train.max_time_s=420 2>&1 | tee "$OUT/run.txt"
python - "$OUT/multi30k-transformer/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["metrics"]
print(f"test BLEU greedy {m['test/bleu_greedy']:.2f} beam {m['test/bleu_beam']:.2f} (target {r['target']['value']}: "
      f"{'met' if r['target']['met'] else 'NOT met'}); val greedy {m['val/bleu_greedy']:.2f} beam {m['val/bleu_beam']:.2f}; "
      f"{r['epochs']:.1f} epochs, stop {r['stop_reason']}; wall {r['wall_time_s']:.0f} s; train {r['train_time_s']:.0f} s; "
      f"{r['throughput']['value']:.0f} {r['throughput']['unit']}; peak {r['peak_memory_mb']:.0f} MB on {r['hardware']['gpu']}")
print("\n".join(r["notes"]))
PY
