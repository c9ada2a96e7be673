"""GPT-2 and LLaMA runs as Hugging Face model directories: config.json + model.safetensors written by the
models' own converters (llmlab/models/gpt.py and llama.py: `save_hf`, proven equal to GPT2LMHeadModel /
LlamaForCausalLM in tests/models/), and the run's tokenizer as HF tokenizer files (tokenizer.py).
`AutoModelForCausalLM` and `AutoTokenizer` load the folder as they load any Hub model (transformers'
"Sharing" guide, https://huggingface.co/docs/transformers/model_sharing).

The weights are read from the run's final model.safetensors with safetensors (no pickle) into the model the
run's config describes, strictly: weights of another shape or set are a CheckpointError before anything is
written. A tensor-parallel run (gpt-tp) saved the single-device GPT's weights (gathered, padding dropped: see
llmlab/parallel/tp_gpt.py), so it exports as any GPT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from llmlab.export.run import RunExport


def load_run_lm(run: RunExport) -> tuple[nn.Module, Any]:
    """(the run's trained GPT or Llama on the CPU, its llmlab tokenizer), from model.safetensors only."""
    from llmlab.data.lm_tokenizers import load_text_tokenizer
    from llmlab.export.run import load_fitting
    from llmlab.models.causal_lm import build_lm
    from llmlab.train.checkpoint import load_weights

    tok = load_text_tokenizer(run.final_file("tokenizer.json", "tokenizer"))
    source = run.final_file("model.safetensors")
    model = build_lm(run.recipe.model_config(run.cfg, run.run_dir, tok))
    load_fitting(model, load_weights(source), source)
    return model.eval(), tok


def write_hf_lm(model: nn.Module, tok: Any, folder: Path) -> dict[str, Any]:
    """`model` (GPT or Llama) as an HF directory in `folder`, with `tok` as HF tokenizer files; returns the
    config.json written."""
    from llmlab.models.gpt import GPT
    from llmlab.models.gpt import save_hf as save_gpt
    from llmlab.models.llama import save_hf as save_llama

    folder.mkdir(parents=True, exist_ok=True)
    (save_gpt if isinstance(model, GPT) else save_llama)(model, folder)
    return add_tokenizer(folder, tok, model.cfg.block_size, str(next(model.parameters()).dtype))


def add_tokenizer(folder: Path, tok: Any, context: int, dtype: str = "float32") -> dict[str, Any]:
    """`tok` as HF tokenizer files in the HF model directory `folder`, and its special-token ids (and the
    weights' dtype) in the folder's config.json; returns that config."""
    from llmlab.export.tokenizer import save_hf_tokenizer

    token_ids = save_hf_tokenizer(tok, folder, context)
    config = json.loads((folder / "config.json").read_text())
    # transformers' defaults (GPT-2: 50256, Llama: 1 and 2) would name ordinary tokens of this vocabulary
    config.update(token_ids)
    config["torch_dtype"] = dtype.removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def describe(model: nn.Module, tok: Any) -> tuple[str, str, list[str]]:
    """(HF class, one line on the architecture, tags) of a GPT or Llama."""
    from llmlab.models.causal_lm import describe_lm
    from llmlab.models.gpt import GPT

    n = sum(p.numel() for p in model.parameters())
    line = f"{describe_lm(model.cfg)}; {n:,} parameters; tokenizer {tok.name} ({tok.vocab_size:,} entries)"
    if isinstance(model, GPT):
        return "GPT2LMHeadModel", line, ["gpt2", "text-generation"]
    return "LlamaForCausalLM", line, ["llama", "text-generation"]


def export_causal_lm(run: RunExport, out: Path) -> None:
    """The exporter of the language-model recipes (a GPT-2 or LLaMA run, fine-tunes included)."""
    model, tok = load_run_lm(run)
    write_hf_lm(model, tok, out)
    cls, line, tags = describe(model, tok)
    run.kind, run.library, run.task = "transformers", "transformers", "text-generation"
    run.architecture = f"{line}. Saved as transformers' `{cls}`."
    run.tags += tags
    run.files.update(
        {
            "config.json": f"transformers config ({cls})",
            "model.safetensors": "the weights (float32, safetensors)",
            "tokenizer.json": f"the run's tokenizer ({tok.name}) for transformers / tokenizers",
            "tokenizer_config.json": "tokenizer settings (PreTrainedTokenizerFast)",
            "special_tokens_map.json": "special tokens",
        }
    )
    run.base = hub_base(run)
    run.usage = lm_usage(run, cls, tok, model.cfg.block_size)
    run.limitations += tokenizer_limitations(tok)


def hub_base(run: RunExport) -> str | None:
    """The Hub id a fine-tune started from (init_from=<Hub id>), or --base-model; else None."""
    if run.base_model:
        return run.base_model
    init = run.init
    if init and init.get("kind") == "hf" and "(Hugging Face Hub," in str(init.get("source", "")):
        return str(init.get("init_from"))
    return None


def tokenizer_limitations(tok: Any) -> list[str]:
    if tok.kind == "char":
        return [
            f"The tokenizer is character-level ({tok.vocab_size} characters, those of the training text): a "
            "character outside it cannot be encoded (the tokenizer raises an error; there is no unknown "
            "token)."
        ]
    if tok.kind == "bert-chinese":
        return [
            "The tokenizer is bert-base-chinese's WordPiece: whitespace is dropped and rare characters "
            "become [UNK]; transformers' `decode` puts spaces between pieces, where llmlab's decode writes "
            "natural text."
        ]
    return []


def _prompt(run: RunExport) -> str:
    samples = getattr(run.cfg, "samples", None)
    return getattr(samples, "prompt", None) or "\n"


def lm_usage(run: RunExport, cls: str, tok: Any, context: int) -> str:
    from llmlab.export.plain import folder_code

    loader, ours = ("gpt", "GPT") if cls.startswith("GPT2") else ("llama", "Llama")
    hub, assign = folder_code(run)
    imports = "\n".join(x for x in (hub, f"from llmlab.models.{loader} import load_hf") if x)
    prompt = _prompt(run)
    new = max(1, min(100, context - len(tok.encode(prompt))))  # the prompt and the samples fit the context
    return f"""With transformers:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({run.ref!r})
model = AutoModelForCausalLM.from_pretrained({run.ref!r}).eval()
ids = tokenizer({json.dumps(prompt, ensure_ascii=False)}, return_tensors="pt").input_ids
with torch.no_grad():  # the context is {context} tokens
    out = model.generate(ids, max_new_tokens={new}, do_sample=True, top_k=200, temperature=0.8)
print(tokenizer.decode(out[0]))
```

With llmlab (the same weights in llmlab's from-scratch `{ours}`, through its converter):

```python
{imports}

{assign}
model = load_hf(folder).eval()
```"""
