"""Stage 6 benchmark: training-step time, tokens/s and MFU of our GPT-2 (llmlab/models/gpt.py).

    python benchmarks/gpt2_step.py [--model gpt2] [--device cuda] [--precision bf16] [--batch 8]
                                   [--block 1024] [--checkpointing] [--steps 10] [--warmup 3]
                                   [--peak-tflops 989]

One training step = forward, cross-entropy over every position, backward, AdamW step, on random token ids
(speed does not depend on the data). Sizes: the GPT-2 presets of `GPT_PRESETS` (gpt2 = 124M, gpt2-medium =
350M, …) or `--model tiny` (a 4-layer, 128-wide model to check the script on a CPU).

FLOPs per token (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1; as PaLM's appendix B
and nanoGPT's `estimate_mfu` count them): 6·N for the matmuls with the N non-embedding-position parameters
(2 forward, 4 backward), plus 12·L·T·d for attention's QKᵀ and PV (L layers, context T, width d); with
activation checkpointing the forward runs twice, so the model does 8·N + 16·L·T·d of work per token while
the "useful" count stays 6·N + 12·L·T·d (MFU counts only the latter, as the PaLM paper defines it).
MFU = useful FLOPs/s ÷ the device's peak (`--peak-tflops`; default: H100/H200 SXM dense bf16, 989 TFLOP/s;
nothing is assumed on a CPU unless given). Prints a markdown row per configuration and peak CUDA memory.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from llmlab.models.gpt import GPT, GPT_PRESETS, GPTConfig


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Useful training FLOPs per token: 6·N (N without the position table) + 12·L·T·d."""
    n = n_params - cfg.block_size * cfg.n_embd  # the position embedding is a lookup, not a matmul
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.block_size * cfg.n_embd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", choices=[*GPT_PRESETS, "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=None, help="context (default: the model's block size)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (CUDA default 989)")
    args = ap.parse_args(argv)

    if args.model == "tiny":
        cfg = GPTConfig(vocab_size=50257, block_size=256, n_layer=4, n_head=4, n_embd=128)
    else:
        cfg = GPT_PRESETS[args.model]
    if args.block:
        cfg = GPTConfig(**{**vars(cfg), "block_size": args.block})
    device = torch.device(args.device)
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.set_activation_checkpointing(args.checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size + 1), device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x[:, :-1])  # [B, T, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    tokens = args.batch * cfg.block_size
    n_params = model.n_params
    tflops = flops_per_token(cfg, n_params) * tokens / sec / 1e12
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "—"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.type == "cuda" else "—"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    now = datetime.datetime.now(datetime.UTC)
    print(f"# {' '.join(sys.argv)}\n# {gpu}, torch {torch.__version__}, {now:%Y-%m-%d %H:%M} UTC")
    print("| model | params | precision | batch × T | ckpt | step ms | tokens/s | TFLOP/s | MFU | peak GiB |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
    print(
        f"| {args.model} | {n_params / 1e6:.1f} M | {args.precision} | {args.batch} × {cfg.block_size} | "
        f"{'yes' if args.checkpointing else 'no'} | {1000 * sec:.1f} | {tokens / sec:,.0f} | {tflops:.1f} | "
        f"{mfu} | {mem} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
