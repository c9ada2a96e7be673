"""llama-lora runs (LoRA, QLoRA) as PEFT adapters: `adapter_config.json` + `adapter_model.safetensors` at the
top of the folder, the layout `peft.PeftModel.from_pretrained(base, REPO_OR_DIR)` and the Hub's adapter
pages expect (PEFT, "Checkpoint format": https://huggingface.co/docs/peft/developer_guides/checkpoint). The
run wrote them already (RUN/adapter/, llmlab/nn/lora.py's `save_adapter`: PEFT's key names, q/k rows in HF's
layout); the export checks them with llmlab's own safetensors reader (no pickle), copies the weights byte for
byte, and sets `base_model_name_or_path` to --base-model when given (the Hub id of the base). The tokenizer
is the base's (a LoRA fine-tune never adds tokens).

An adapter is nothing without its base, which the card names: the run's init (init.json: another llmlab run
— export that one too and load the adapter onto it —, an HF directory, or a Hub id). With --merged (or when
the run already holds RUN/merged/, finetune.export_merged=true) the folder also gets merged/: the base with
the update merged into float32 weights, an HF LlamaForCausalLM directory, built from the init and the adapter
as `llmlab eval` rebuilds the model (so the init must still exist). For QLoRA this is exact: the trained
model is the dequantized base plus the update.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llmlab.export.run import RunExport

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED = "merged"


def export_adapter(run: RunExport, out: Path) -> None:
    """The exporter of llama-lora runs with finetune.method lora / qlora."""
    from llmlab.data.lm_tokenizers import load_text_tokenizer
    from llmlab.export.causal_lm import hub_base, tokenizer_limitations
    from llmlab.export.tokenizer import save_hf_tokenizer
    from llmlab.nn.lora import _read_adapter
    from llmlab.train.checkpoint import CheckpointError

    folder = run.final_file("adapter", "adapter (adapter/)")
    try:
        lora, tensors, _ = _read_adapter(folder)  # safetensors only; config checked to be plain LoRA
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{run.run_dir}: its adapter cannot be read: {err}") from err
    bad = [k for k, t in tensors.items() if not t.is_floating_point() or not t.isfinite().all()]
    if bad:
        raise CheckpointError(f"{folder}/adapter_model.safetensors: non-finite or integer tensors {bad[:3]}")
    init = run.init or {}
    base = hub_base(run)
    config = json.loads((folder / "adapter_config.json").read_text())
    if run.base_model:
        config["base_model_name_or_path"] = run.base_model
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(folder / "adapter_model.safetensors", out / "adapter_model.safetensors")
    tok = load_text_tokenizer(run.final_file("tokenizer.json", "tokenizer"))
    block = init.get("model", {}).get("max_position_embeddings", 2048)
    save_hf_tokenizer(tok, out, block)

    method = run.cfg.finetune.method
    merged = _merged(run, out, tok, block)
    run.kind, run.library, run.task, run.base = "peft", "peft", "text-generation", base
    targets = lora.target_modules if isinstance(lora.target_modules, list) else [lora.target_modules]
    n = sum(t.numel() for t in tensors.values())
    run.architecture = (
        f"a {'QLoRA' if method == 'qlora' else 'LoRA'} adapter (PEFT format) for a LLaMA: r={lora.r}, "
        f"alpha={lora.alpha:g}{', rsLoRA' if lora.use_rslora else ''} on {', '.join(targets)} "
        f"({len(tensors) // 2} layers, {n:,} parameters)"
    )
    run.tags += ["llama", "lora", "peft", "text-generation"] + (["qlora"] if method == "qlora" else [])
    run.files.update(
        {
            "adapter_config.json": "the PEFT LoraConfig (r, alpha, target modules, base model)",
            "adapter_model.safetensors": "the LoRA factors A and B (PEFT's key names, HF's q/k row order)",
            "tokenizer.json": f"the base model's tokenizer ({tok.name}) for transformers / tokenizers",
            "tokenizer_config.json": "tokenizer settings (PreTrainedTokenizerFast)",
            "special_tokens_map.json": "special tokens",
        }
    )
    if merged:
        run.files[f"{MERGED}/"] = "the base with the update merged in: a LlamaForCausalLM directory (float32)"
    needs, hint = base_needed(run, init, base)
    run.usage = adapter_usage(run, needs, hint, merged, max(1, min(100, block - 1)))
    run.limitations.append(f"This is an adapter, not a model: it needs its base model, {needs}.")
    if method == "qlora":
        run.limitations.append(
            "Trained with QLoRA on llmlab's NF4-quantized base (block 64): applied to the float base, the "
            "adapter's outputs differ from the trained model's by the quantization error; merged/ "
            "(`llmlab export --merged`) is exactly the trained model (dequantized base + update)."
        )
    run.limitations += tokenizer_limitations(tok)


def base_needed(run: RunExport, init: dict, base: str | None) -> tuple[str, str]:
    """(the base model in words, python that loads it as an HF LlamaForCausalLM into `base`)."""
    kind, source = init.get("kind"), init.get("source", init.get("init_from"))
    if base:
        return f"`{base}` on the Hugging Face Hub", f"base = AutoModelForCausalLM.from_pretrained({base!r})"
    if kind == "run":
        return (
            f"the llmlab run it was trained on, {source} (export it with `llmlab export {source} --out "
            "BASE_DIR` and upload that too; pass --base-model REPO_ID here to record its Hub id)",
            'base = AutoModelForCausalLM.from_pretrained("BASE_DIR")  # `llmlab export` of the base run',
        )
    if kind == "hf":
        return (
            f"the Hugging Face Llama directory it was trained on, {source}",
            f"base = AutoModelForCausalLM.from_pretrained({str(source)!r})",
        )
    return (
        "a random initialisation (init_from=scratch, seeded by the run's seed) that exists nowhere else: "
        "export with --merged for the trained model itself",
        "base = ...  # init_from=scratch: no published base; use merged/ (llmlab export --merged)",
    )


def _merged(run: RunExport, out: Path, tok: Any, block: int) -> bool:
    """Write merged/ when the run has one or --merged asks for it; whether it was written."""
    from llmlab.export.causal_lm import add_tokenizer, write_hf_lm

    saved = run.run_dir / MERGED
    if (saved / "config.json").is_file():  # finetune.export_merged=true: the run wrote it
        from llmlab.train.checkpoint import load_weights

        load_weights(saved / "model.safetensors")  # CheckpointError when missing or damaged
        shutil.copytree(saved, out / MERGED)
        add_tokenizer(out / MERGED, tok, block)
        return True
    if not run.merged:
        return False
    from llmlab.train.rng import seed_everything

    seed_everything(run.cfg.seed)  # init_from=scratch: the same random base the run started from
    model = run.recipe.load_trained(run.run_dir, run.cfg, tok)  # init + adapter, merged, float32
    write_hf_lm(model.float().eval(), tok, out / MERGED)
    return True


def adapter_usage(run: RunExport, needs: str, base_code: str, merged: bool, new_tokens: int) -> str:
    text = f"""The adapter needs its base model, {needs}. With transformers and peft:

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

{base_code}
model = PeftModel.from_pretrained(base, {run.ref!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({run.ref!r})
ids = tokenizer("\\n", return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(input_ids=ids, max_new_tokens={new_tokens}, do_sample=True, top_k=200)
print(tokenizer.decode(out[0]))
```

`model.merge_and_unload()` folds the update into the base's weights."""
    if merged:
        where = f"{run.ref}/{MERGED}" if not run.repo_id else f"{run.repo_id}, subfolder {MERGED!r}"
        sub = (
            f'AutoModelForCausalLM.from_pretrained({run.repo_id!r}, subfolder="{MERGED}")'
            if run.repo_id
            else f"AutoModelForCausalLM.from_pretrained({f'{run.ref}/{MERGED}'!r})"
        )
        text += f"\n\nThe merged model ({where}) loads alone: `{sub}`."
    return text
