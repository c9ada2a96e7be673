#!/usr/bin/env bash
# Stage 2 on one GPU, as one prepared script (≤10 minutes on an H100/H200-class GPU):
#   1. the data path's images/s on the GPU, 2. step time ours vs torchvision (bf16), 3. cifar10-resnet18's
#   default preset (40 epochs, batch 512, bf16, channels_last), recording accuracy and wall time.
# Usage (repository root, a CUDA machine; LLMLAB_DATA pointing at the data root):
#   bash benchmarks/gpu_stage2.sh [OUT_DIR]
# Then copy the printed figures and OUT_DIR/cifar10-resnet18/result.json into docs/results.md.
set -euo pipefail
OUT="${1:-${OUT:-runs/gpu-stage2}}"
mkdir -p "$OUT"
python -m pip install --quiet -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python benchmarks/cifar_data.py 2>&1 | tee "$OUT/data_path.txt"
python benchmarks/resnet_step.py --device cuda --precision bf16 --batch 512 --repeats 5 2>&1 | tee "$OUT/step_time.txt"
LLMLAB_PROGRESS=0 timeout 480 llmlab run cifar10-resnet18 --device cuda --out "$OUT/cifar10-resnet18" 2>&1 \
  | tee "$OUT/run.txt"
python - "$OUT/cifar10-resnet18/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"test accuracy {r['metrics']['test/accuracy']:.4f} (target {r['target']['value']}: "
      f"{'met' if r['target']['met'] else 'NOT met'}); wall {r['wall_time_s']:.0f} s; train {r['train_time_s']:.0f} s; "
      f"{r['throughput']['value']:.0f} {r['throughput']['unit']}; peak {r['peak_memory_mb']:.0f} MB on {r['hardware']['gpu']}")
PY
