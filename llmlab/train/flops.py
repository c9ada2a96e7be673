"""Model FLOPs utilisation (MFU): the FLOPs a model's training needs per token, against the device's peak.

MFU (Chowdhery et al. 2022, "PaLM", Appendix B) = achieved model FLOP/s ÷ peak FLOP/s, with the model's
FLOPs counted from its shape — not what the hardware executed (recomputation, padding and communication
do not count). For a GPT of L layers, width d, vocabulary V and context T, per token:

    forward    2·(12·L·d² + V·d)   the matrix products (4d² attention projections + 8d² MLP per layer, and
                                   the V·d head; the embedding lookup has none)
             + 4·L·T·d             attention scores QKᵀ and the weighted sum AV (T keys each, full square:
                                   the convention of PaLM and nanoGPT, causal masking not discounted)
    training   3 × forward         backward costs twice the forward (gradients of inputs and of weights)

i.e. 6·N + 12·L·T·d with N = 12·L·d² + V·d, PaLM's 6N + 12LHQT.

Peak FLOP/s is never assumed for one device (nanoGPT divides by an A100's 312 TFLOPS whatever it runs on):
`peak_flops` reads it from a table of datasheet dense peaks by GPU name and precision, estimates a CPU's from
its threads × clock × FLOPs per cycle of its vector units (AVX-512: 2 FMA units × 16 fp32 lanes × 2 FLOPs),
or takes the figure the user gives; it returns where the number came from, and None when it cannot know.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

__all__ = ["GPU_PEAK_TFLOPS", "gpt_flops_per_token", "peak_flops"]


def gpt_flops_per_token(n_layer: int, n_embd: int, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a GPT (the docstring's count)."""
    n = 12 * n_layer * n_embd**2 + vocab_size * n_embd
    return 6 * n + 12 * n_layer * seq_len * n_embd


# Datasheet dense (no sparsity) peaks in TFLOP/s: 16-bit tensor cores, and fp32 without TF32 (torch's default
# for matrix products). Matched by substring of torch.cuda.get_device_name(), most specific first.
GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.0, 66.9),  # SXM
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("V100", 125.0, 15.7),  # fp16 (no bf16)
    ("T4", 65.0, 8.1),  # fp16 (no bf16)
]


def _cpu_estimate() -> tuple[float | None, str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "unknown CPU (no /proc/cpuinfo): give parallel.peak_tflops"
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    if not mhz or not flags:
        return None, "CPU clock or flags unknown: give parallel.peak_tflops"
    f = set(flags.group(1).split())
    if "avx512f" in f:
        per_cycle, isa = 64, "AVX-512, 2 FMA units x 16 fp32 lanes x 2"
    elif "avx2" in f and "fma" in f:
        per_cycle, isa = 32, "AVX2, 2 FMA units x 8 fp32 lanes x 2"
    else:
        per_cycle, isa = 8, "SSE, 4 fp32 lanes x 2"
    threads = torch.get_num_threads()
    ghz = float(mhz.group(1)) / 1000
    source = f"estimated: {threads} thread(s) x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"
    return threads * ghz * 1e9 * per_cycle, source


def peak_flops(
    device: torch.device, precision: str, given_tflops: float | None = None
) -> tuple[float | None, str]:
    """(peak FLOP/s of one process's device, where the figure comes from); (None, why) when unknown."""
    if given_tflops is not None:
        return given_tflops * 1e12, f"given: {given_tflops:g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, single in GPU_PEAK_TFLOPS:
            if key in name:
                tflops = half if precision in ("bf16", "fp16") else single
                return tflops * 1e12, f"datasheet ({name}, {precision}): {tflops:g} TFLOP/s dense"
        return None, f"{name} is not in llmlab.train.flops.GPU_PEAK_TFLOPS: give parallel.peak_tflops"
    if device.type == "cpu":
        return _cpu_estimate()
    return None, f"no peak known for {device.type}: give parallel.peak_tflops"
