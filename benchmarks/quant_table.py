"""Quantization table of a trained LLaMA run: weight bytes, val loss and speed in fp32, bf16, int8 and NF4.

    python benchmarks/quant_table.py RUN_DIR [--data-dir D] [--out results.json] [--batches N]

docs/results.md's table (a few minutes on 2 idle cores; the default --batches is the run's eval_batches, 60):

    LLMLAB_DATA=/work/shared/data python benchmarks/quant_table.py runs/llama-pretrain-cpu \
        --out runs/quant-table/results.json

What it measures. The run's experiment is rebuilt as `llmlab eval` does (`llmlab.runner.evaluate_run`: the
recipe's build with the run directory as context, so its own tokenizer and validation windows, then its
final weights), and the validation split is evaluated with the Trainer's `evaluate` under each
configuration:

- fp32: the trained model as it is;
- fp32 transformers: the same weights through `save_hf` and `transformers.LlamaForCausalLM` (no
  quantization): the baseline of the bitsandbytes rows, which run inside transformers' model;
- bf16: the model cast to bfloat16 (weights and activations; RMSNorm and the RoPE angles stay float32 inside
  the model). The logits come out in bf16 and `CausalLMTask` casts them to float32 before the
  cross-entropy, so the loss itself is a float32 softmax of bf16-rounded logits;
- int8 absmax per row (ours, `Int8Linear`: weight-only, dequantized into an fp32 `F.linear`);
- LLM.int8 (Dettmers, Lewis, Belkada & Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication for
  Transformers at Scale"): ours (`LLMInt8Linear`, threshold 6) and bitsandbytes' (`BitsAndBytesConfig(
  load_in_8bit=True)`, threshold 6 by default);
- NF4, blocks of 64, without and with double quantization (Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023,
  "QLoRA: Efficient Finetuning of Quantized LLMs"): ours (`NF4Linear`) and bitsandbytes'
  (`load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32`, optionally
  `bnb_4bit_use_double_quant=True`).

Which layers. bitsandbytes (through transformers) replaces every `nn.Linear` except the output head (its
`get_keys_to_not_convert` keeps the last module and tied weights): the 7 projections of every decoder block.
Ours quantizes the same ones (`quantize_model(..., skip=("lm_head",))`). The embedding is never a linear
layer; the llama-pretrain runs tie the head to it, so the 6,403 x 192 table stays float32 in every quantized
row (it is 1.23 M of the 2.85 M parameters: the floor under every quantized size).
The bitsandbytes rows load `save_hf`'s directory into `LlamaForCausalLM.from_pretrained(dir,
quantization_config=...)`, wrapped in a module whose forward(idx) returns `.logits`, so the same
`evaluate` runs on them.

Columns.
- weight bytes: every parameter of the model once (the tied head is the embedding), quantized layers at
  their stored size: codes + scales (int8: one fp32 scale per row; bitsandbytes' `SCB`), NF4 packed codes
  + fp32 absmax per 64 weights, or with double quantization uint8 absmax codes + an fp32 scale per 256 of
  them + the fp32 mean. Constant code books (16 NF4 levels, the 256-value dynamic map) are not counted,
  nor buffers that are no weights (rotary frequencies). For bitsandbytes: as loaded, before any forward
  (see "CPU repacking" below for what its CPU inference then holds; the JSON has both);
- linear bytes: the same count for the decoder's linear layers alone (what quantization acts on; 4 x 7 = 28
  for the cpu preset);
- val loss/char (nats per character), val ppl (per token, exp of the loss per token), delta loss: the
  loss per token minus fp32's (the char tokenizer makes a token one character, so both are the same here);
- KL vs fp32: mean KL(p_fp32 || p) of the next-token distributions over the first val batch (2,048
  positions for the cpu preset), nats: the distance the quantization moved the model, which a loss change
  of a few 1e-4 (noise-sized for int8) does not resolve;
- tokens/s: validation tokens over the wall time of `evaluate` over the whole split (forward, loss,
  accuracy), after one warm-up forward of the first batch; torch's threads as the machine sets them
  (recorded in the JSON). In parentheses the median over batches of each batch's tokens/s, which a burst
  of load from other processes on a shared machine moves much less than the wall time.

CPU repacking (bitsandbytes 0.50 on a CPU with AVX512-BF16): in eval mode without gradients, `Linear4bit`
converts its weight at the first forward to a CPU layout whose block absmax is bfloat16 (double quantization
is undone into that bf16 table) and multiplies in bfloat16 (activations cast to bf16) whatever
`bnb_4bit_compute_dtype` says. On other CPUs it dequantizes to float32 and runs `F.linear`. bitsandbytes'
LLM.int8 casts the activations to fp16 before quantizing them on CPU (its int8 weights also come from the
fp16-cast weight).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.models.llama import Llama, save_hf
from llmlab.nn.quant import quantize_model, weight_bytes
from llmlab.recipes import BuildContext
from llmlab.runner import load_run_config, load_run_weights
from llmlab.train.distributed import DistEnv
from llmlab.train.rng import seed_everything
from llmlab.train.trainer import evaluate

SKIP = ("lm_head",)  # what bitsandbytes keeps in float (the output head); see the module docstring


# ------------------------------------------------------------------------------------------------ the run
def load_run(
    run_dir: Path, data_dir: Path | None = None, batches: int | None = None
) -> tuple[nn.Module, Any, Any]:
    """(model with the run's final weights, task, val loader) rebuilt as `llmlab.runner.evaluate_run` does;
    `batches` replaces the run's data.eval_batches (None: the run's own)."""
    recipe, cfg, _ = load_run_config(run_dir)
    if batches is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_batches=batches))
    seed_everything(cfg.seed)
    dev = torch.device("cpu")
    exp = recipe.build(cfg, BuildContext(device=dev, dist=DistEnv(), data_dir=data_dir, run_dir=run_dir))
    if exp.load_model is not None:
        exp.load_model(exp.model, run_dir)
    else:
        load_run_weights(run_dir, exp.model, map_location="cpu")
    return exp.model.eval(), exp.task, exp.eval_loaders["val"]


def linear_names(model: nn.Module) -> list[str]:
    """The linear layers quantization acts on: every `nn.Linear` but the skipped head."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(SKIP)]


# ---------------------------------------------------------------------------------------- configurations
class HFLogits(nn.Module):
    """A transformers causal LM as a module whose forward(idx) gives the logits [B, T, V], like ours."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, idx: Tensor) -> Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits


def _ours(method: str, double_quant: bool = False) -> Callable[[Llama, Path], nn.Module]:
    def build(model: Llama, hf_dir: Path) -> nn.Module:
        q = copy.deepcopy(model)
        quantize_model(q, method, skip=SKIP, double_quant=double_quant, threshold=6.0, blocksize=64)
        return q

    return build


def _bf16(model: Llama, hf_dir: Path) -> nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16)


def _hf(quantization: dict[str, Any] | None) -> Callable[[Llama, Path], nn.Module]:
    """Load `save_hf`'s directory with transformers, quantized by bitsandbytes when `quantization` is given
    (the keyword arguments of BitsAndBytesConfig)."""

    def build(model: Llama, hf_dir: Path) -> nn.Module:
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if quantization is not None:
            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
        return HFLogits(LlamaForCausalLM.from_pretrained(hf_dir, **kwargs)).eval()

    return build


_NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    impl: str  # ours / transformers / bitsandbytes
    build: Callable[[Llama, Path], nn.Module]


CONFIGS: list[Config] = [
    Config("fp32", "ours", lambda model, hf_dir: model),
    Config("fp32", "transformers", _hf(None)),
    Config("bf16", "ours", _bf16),
    Config("int8 absmax/row", "ours", _ours("int8")),
    Config("LLM.int8 (t=6)", "ours", _ours("llm.int8")),
    Config("LLM.int8 (t=6)", "bitsandbytes", _hf({"load_in_8bit": True})),
    Config("NF4", "ours", _ours("nf4")),
    Config("NF4", "bitsandbytes", _hf(_NF4)),
    Config("NF4 + double quant", "ours", _ours("nf4", double_quant=True)),
    Config("NF4 + double quant", "bitsandbytes", _hf({**_NF4, "bnb_4bit_use_double_quant": True})),
]


# ------------------------------------------------------------------------------------------------- bytes
def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _bnb_state_bytes(module: nn.Module) -> int:
    """Bytes a bitsandbytes layer stores beside its weight parameter (scales / absmax statistics), code
    books excluded; 0 for any other module."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return 0
    import bitsandbytes.nn as bnb_nn

    weight = module.weight
    if isinstance(module, bnb_nn.Linear8bitLt):  # fp32 absmax per row: on the weight until the first forward
        return _nbytes(weight.SCB if weight.SCB is not None else module.state.SCB)  # moves it to the state
    state = getattr(weight, "quant_state", None)
    if state is None:  # not a 4-bit weight
        return 0
    total = _nbytes(state.absmax)
    if state.nested:  # uint8 absmax codes above; their fp32 scale per 256 and the fp32 mean
        total += _nbytes(state.state2.absmax) + _nbytes(state.offset)
    return total


def model_bytes(model: nn.Module, names: Iterable[str]) -> tuple[int, int]:
    """(bytes of the whole model's weights, bytes of the layers `names`), counted as the module docstring
    says: parameters once, plus the stored codes and statistics of ours and bitsandbytes' layers."""
    hf = model.hf if isinstance(model, HFLogits) else None
    root = hf if hf is not None else model
    total = weight_bytes(root) + sum(_bnb_state_bytes(m) for m in root.modules())
    linear = 0
    for name in names:
        m = root.get_submodule(name)
        linear += weight_bytes(m) + _bnb_state_bytes(m)
    return total, linear


# ------------------------------------------------------------------------------------------------ timing
class _Counting:
    """A loader that counts the tokens it yields (the task's units) and times what the consumer does with
    each batch (from handing it out to being asked for the next)."""

    def __init__(self, loader: Iterable, task: Any) -> None:
        self.loader, self.task = loader, task
        self.tokens, self.batch_rates = 0, []  # rates: tokens / s of each batch

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            n = self.task.units(batch)
            self.tokens += n
            t0 = time.perf_counter()
            yield batch
            self.batch_rates.append(n / (time.perf_counter() - t0))


def first_batch_logits(model: nn.Module, loader: Iterable) -> Tensor:
    """Logits [B, T, V] (float32) of the first batch: the warm-up forward, kept for the KL column."""
    model.eval()
    with torch.no_grad():
        return model(next(iter(loader))[0]).float()


def kl_per_token(logits: Tensor, ref: Tensor) -> float:
    """Mean KL(p_ref || p) over the positions, nats: how far the next-token distributions moved."""
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    logp_ref = torch.log_softmax(ref.reshape(-1, ref.shape[-1]), dim=-1)
    return (F.kl_div(logp, logp_ref, log_target=True, reduction="sum") / logp.shape[0]).item()


def measure(
    model: nn.Module, task: Any, loader: Iterable, ref_logits: Tensor | None = None
) -> dict[str, float]:
    """`evaluate`'s metrics on the loader, tokens/s (one warm-up forward of the first batch, then the whole
    split timed; also the median over batches of each batch's tokens/s) and, given the fp32 model's logits
    of the first batch, the KL from them to this model's."""
    logits = first_batch_logits(model, loader)  # the warm-up
    counted = _Counting(loader, task)
    t0 = time.perf_counter()
    metrics = evaluate(model, task, counted, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    out = {
        **metrics,
        "tokens": counted.tokens,
        "eval_s": seconds,
        "tokens_per_s": counted.tokens / seconds,
        "tokens_per_s_median_batch": statistics.median(counted.batch_rates),
    }
    if ref_logits is not None:
        out["kl_vs_fp32"] = kl_per_token(logits, ref_logits)
    return out


# ------------------------------------------------------------------------------------------------- table
def quant_table(
    run_dir: Path | str,
    data_dir: Path | str | None = None,
    batches: int | None = None,
    configs: list[Config] | None = None,
) -> dict[str, Any]:
    """Every configuration of `configs` (default CONFIGS) on the run's val split: a dict with the run's
    facts and one row per configuration (a row that fails holds its error instead of figures)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", per call
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover: the transformers rows fail by themselves
        pass
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    base, task, loader = load_run(run_dir, Path(data_dir) if data_dir else None, batches)
    if not isinstance(base, Llama):
        raise TypeError(f"{run_dir} holds a {type(base).__name__}, not a LLaMA: the table needs save_hf")
    names = linear_names(base)
    ref_logits = first_batch_logits(base, loader)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quant-table-") as tmp:
        hf_dir = save_hf(base, Path(tmp) / "hf")
        for cfg in configs or CONFIGS:
            row: dict[str, Any] = {"config": cfg.name, "impl": cfg.impl}
            try:
                model = cfg.build(base, hf_dir)
                row["weight_bytes"], row["linear_bytes"] = model_bytes(model, names)
                row.update(measure(model, task, loader, ref_logits))
                if isinstance(model, HFLogits):  # bitsandbytes' CPU kernels may repack at the first forward
                    after = model_bytes(model, names)
                    row["weight_bytes_after_eval"], row["linear_bytes_after_eval"] = after
            except Exception as err:  # one configuration failing (e.g. no bitsandbytes) keeps the others
                row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            print(f"  {cfg.name} ({cfg.impl}): {_summary(row)}", file=sys.stderr, flush=True)
    ref = next((r for r in rows if "loss" in r and (r["config"], r["impl"]) == ("fp32", "ours")), None)
    for r in rows:
        if ref is not None and "loss" in r:
            r["delta_loss"] = r["loss"] - ref["loss"]
    return {
        "run_dir": str(run_dir),
        "val_batches": len(loader),
        "quantized_layers": names,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for pkg in ("transformers", "bitsandbytes"):
        try:
            out[pkg] = __import__(pkg).__version__
        except ImportError:
            out[pkg] = "absent"
    return out


def _summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return "failed: " + row["error"]
    return f"loss {row['loss']:.4f}, {row['tokens_per_s']:,.0f} tokens/s"


def markdown(result: dict[str, Any]) -> str:
    head = "| configuration | implementation | weight MiB | linear layers MiB | val loss/char | val ppl | "
    head += "Δ loss vs fp32 | KL vs fp32 (batch 1) | tokens/s (median batch) |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['impl']} | failed: {r['error']} | | | | | | |")
            continue
        mib, linear_mib = r["weight_bytes"] / 2**20, r["linear_bytes"] / 2**20
        lines.append(
            f"| {r['config']} | {r['impl']} | {mib:.3f} | {linear_mib:.3f}"
            f" | {r.get('loss_per_char', r['loss']):.4f} | {r['ppl']:.2f} | {r.get('delta_loss', 0.0):+.4f}"
            f" | {r['kl_vs_fp32']:.2e} | {r['tokens_per_s']:,.0f} ({r['tokens_per_s_median_batch']:,.0f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="a finished llama-pretrain run")
    ap.add_argument("--data-dir", type=Path, default=None, help="data root (default: $LLMLAB_DATA)")
    ap.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    ap.add_argument("--batches", type=int, default=None, help="val batches (default: the run's eval_batches)")
    args = ap.parse_args(argv)
    result = quant_table(args.run_dir, args.data_dir, args.batches)
    print(markdown(result))
    print(
        f"\n{result['val_batches']} val batches, {result['torch_threads']} torch threads, "
        f"{result['wall_s']:.0f} s in all"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
