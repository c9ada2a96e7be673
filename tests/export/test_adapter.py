"""llama-lora runs export as PEFT adapters: `peft.PeftModel.from_pretrained` puts the exported adapter on the
exported base (the llama-pretrain run it was trained on, exported to HF) and gives the logits of llmlab's
model as `llmlab generate` loads it (init + adapter, merged); the card names the base and its code runs;
--base-model records the base's Hub id; --merged adds the merged model, which transformers loads alone.

Tolerance as tests/export/test_causal_lm.py: float32, the same function by other kernels (HF + PEFT's
W x + s·B(A x) vs the merged weights), ~1e-6 apart; the adapter itself moves the logits by > 1e-3."""

from __future__ import annotations

import pytest
import torch

from llmlab.recipes.gpt_lm import Generator
from tests.export.helpers import front_matter, read_json, run_card_code, section

TOL = 1e-5


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))  # [2, 16]


def test_peft_loads_the_adapter_onto_the_exported_base(train, export):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, out, base_out = train("llama-lora"), export("llama-lora"), export("llama-pretrain")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "model.safetensors").exists() and not (out / "merged").exists()
    ours = Generator.from_run(run_dir).model  # the init rebuilt, the run's adapter loaded and merged
    base = AutoModelForCausalLM.from_pretrained(base_out).eval()
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = _ids(ours.cfg.vocab_size)
    with torch.no_grad():
        expected = ours(ids)  # [2, 16, V]
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=TOL)
        with peft_model.disable_adapter():
            assert (peft_model(ids).logits - expected).abs().max() > 1e-3  # the adapter does change it


def test_card_names_the_base_and_its_code_runs(train, export):
    pytest.importorskip("peft")
    out, base_out = export("llama-lora"), export("llama-pretrain")
    card = out / "README.md"
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "base_model" not in meta  # an llmlab run is no Hub id
    how = section(card, "How to load")
    assert str(train("llama-pretrain")) in how and "llmlab export" in how
    assert "needs its base model" in section(card, "Limitations")
    (space,) = run_card_code(card, replace={"BASE_DIR": str(base_out)})  # the placeholder a user fills in
    assert space["out"].shape[1] > space["ids"].shape[1]


def test_base_model_and_merged(train, export):
    from transformers import AutoModelForCausalLM

    out = export("llama-lora", base_model="someone/tiny-llama", merged=True)
    assert read_json(out / "adapter_config.json")["base_model_name_or_path"] == "someone/tiny-llama"
    assert front_matter(out / "README.md")["base_model"] == "someone/tiny-llama"
    assert "someone/tiny-llama" in section(out / "README.md", "How to load")
    ours = Generator.from_run(train("llama-lora")).model
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = _ids(ours.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours(ids), rtol=0, atol=TOL)
