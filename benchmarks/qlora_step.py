"""Stage 7 benchmark: one fine-tuning step of our LLaMA with LoRA, QLoRA (NF4 base) or full fine-tuning —
step time, tokens/s, peak memory and the bytes of the weights.

    python benchmarks/qlora_step.py [--model llama2-7b] [--method qlora] [--r 64] [--batch 4] [--seq 512]
                                    [--checkpointing] [--steps 5] [--warmup 2] [--device cuda]

The model is built from `LLAMA_PRESETS` (llama2-7b = 6.74 B parameters, llama2-13b, ...) or `--model tiny`
(2 layers, 256 wide: checks the script on a CPU) with random weights — speed and memory do not depend on the
values, and nothing has to be downloaded. Weights are bf16 on CUDA (fp32 on a CPU); `qlora` stores every
linear layer of the blocks in NF4 (llmlab/nn/quant.py, block 64, double quantization) as QLoRA's 7B setting,
built one block at a time so a 7B model never exists in float32; LoRA factors (r, alpha 16, every linear
layer) are float32 (PEFT's default for a 16-bit base). One step = forward on random token ids, cross-entropy
at every position, backward, AdamW over the trainable parameters. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from llmlab.models.llama import LLAMA_PRESETS, Llama, LlamaConfig, rope_inv_freq
from llmlab.nn.lora import LoRAConfig, inject_lora
from llmlab.nn.quant import NF4Linear, quantize_model, weight_bytes
from llmlab.recipes.llama_lora import ALL_LINEAR


def _init(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Materialize a meta-device module on `device` in `dtype`: N(0, 0.02) weights, unit norm gains."""
    module.to_empty(device=device)
    module.to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)


def build(cfg: LlamaConfig, method: str, r: int, device: torch.device, dtype: torch.dtype) -> Llama:
    """The model on `device` in `dtype`, built one block at a time from the meta device and, for qlora,
    each block quantized before the next exists (a 70B model never exists in 16-bit), LoRA injected unless
    full. The output layer is materialized on its own (the presets' heads are untied)."""
    with torch.device("meta"):
        model = Llama(cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in model.model.layers:
        _init(layer, device, dtype, gen)
        if method == "qlora":
            quantize_model(layer, "nf4", skip=(), double_quant=True)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        _init(module, device, dtype, gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = rope_inv_freq(cfg)  # a plain tensor, made on the meta device above
    if method != "full":
        model.requires_grad_(False)
        types = (NF4Linear,) if method == "qlora" else (torch.nn.Linear,)
        inject_lora(model, LoRAConfig(r=r, alpha=16, target_modules=ALL_LINEAR), linear_types=types)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b", choices=[*LLAMA_PRESETS, "tiny"])
    ap.add_argument("--method", default="qlora", choices=["lora", "qlora", "full"])
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    if args.model == "tiny":
        cfg = LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )  # fmt: skip
    else:
        cfg = dataclasses.replace(LLAMA_PRESETS[args.model])
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build(cfg, args.method, args.r, device, dtype)
    model.set_activation_checkpointing(args.checkpointing)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    n_trainable = sum(p.numel() for p in trainable)
    bytes_weights = weight_bytes(model)
    gen = torch.Generator(device=device).manual_seed(1)

    def step() -> float:
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    t = statistics.median(times)
    row = {
        "model": args.model,
        "method": args.method,
        "r": args.r if args.method != "full" else None,
        "batch": args.batch,
        "seq": args.seq,
        "checkpointing": args.checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "trainable_params": n_trainable,
        "weight_gib": bytes_weights / 2**30,
        "step_s": t,
        "tokens_per_s": args.batch * args.seq / t,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
