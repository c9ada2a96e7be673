"""Memory of a training run, per rank: predicted before it runs (the ZeRO paper's accounting of parameters,
gradients and optimizer states — Rajbhandari et al. 2020 — and our GPT's activations after Korthikanti et al.
2022) and measured while it runs (saved-tensor hooks, storage bytes, RSS, CUDA peak). `llmlab memory` prints
the prediction; `MemoryProbe` records the measurement beside it in a run directory.
"""

from llmlab.memory.activations import ActivationEstimate, ActivationShape, Term, estimate_activations
from llmlab.memory.measure import SavedTensorMeter, state_bytes, write_memory_record
from llmlab.memory.predict import (
    MemoryPrediction,
    layout_for,
    predict_for_model,
    predict_memory,
    predict_states,
)
from llmlab.memory.probe import MemoryProbe

__all__ = [
    "ActivationEstimate",
    "ActivationShape",
    "MemoryPrediction",
    "MemoryProbe",
    "SavedTensorMeter",
    "Term",
    "estimate_activations",
    "layout_for",
    "predict_for_model",
    "predict_memory",
    "predict_states",
    "state_bytes",
    "write_memory_record",
]
