"""GPT-2 and LLaMA runs (shakespeare-gpt, gpt-pretrain, gpt-finetune, gpt-tp, llama-pretrain) export as
Hugging Face directories: transformers' AutoModelForCausalLM gives the logits of llmlab's model as
`llmlab generate` / `llmlab serve` load it (Generator.from_run), AutoTokenizer gives llmlab's token ids and
decodes them back to the text, and the card's code runs.

Tolerance: the same float32 function computed by other kernels (HF's Conv1D / fused q-k-v, rotate_half on
permuted q/k rows vs our rotary pairs) agrees to ~1e-6 on these tiny models; 1e-5 leaves room and still
catches any real conversion error (a transposed or unpermuted projection moves logits by > 1e-2)."""

from __future__ import annotations

import pytest
import torch

from llmlab.recipes.gpt_lm import SYNTHETIC, Generator
from tests.export.helpers import front_matter, read_json, run_card_code

TOL = 1e-5
KINDS = [
    ("shakespeare-gpt", "gpt2", "synthetic"),
    ("gpt-finetune", "gpt2", "synthetic-zh-poems"),
    ("gpt-tp", "gpt2", "synthetic"),
    ("llama-pretrain", "llama", "synthetic-zh"),
    pytest.param("gpt-pretrain", "gpt2", "synthetic-zh", marks=pytest.mark.slow),  # as shakespeare-gpt
]


@pytest.mark.parametrize(("recipe", "model_type", "corpus"), KINDS)
def test_transformers_loads_the_same_model_and_tokenizer(train, export, recipe, model_type, corpus):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_dir, out = train(recipe), export(recipe)
    ours = Generator.from_run(run_dir)  # how llmlab generate / serve load the run
    assert AutoConfig.from_pretrained(out).model_type == model_type
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = SYNTHETIC[corpus][0]()[:200]
    ids = tokenizer(text, return_tensors="pt").input_ids  # [1, T]
    assert ids[0].tolist() == ours.tok.encode(text)
    assert tokenizer.decode(ids[0]) == text
    ids = ids[:, : ours.model.cfg.block_size]
    with torch.no_grad():
        expected = ours.model(ids)  # [1, T, V]
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=TOL)
        (space,) = run_card_code(out / "README.md", having="load_hf")  # the card's llmlab block
        torch.testing.assert_close(space["model"](ids), expected, rtol=0, atol=TOL)
    config = read_json(out / "config.json")
    assert config["eos_token_id"] is None and config["bos_token_id"] is None  # a char vocabulary has none
    meta = front_matter(out / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"


def test_the_card_code_generates_with_transformers(export):
    (space,) = run_card_code(export("shakespeare-gpt") / "README.md", having="generate")
    assert space["out"].shape[1] > space["ids"].shape[1]


@pytest.mark.slow
def test_a_tensor_parallel_run_exports_the_whole_gpt(tmp_path):
    """gpt-tp under torchrun with TP 2: the run saved the single-device GPT (gathered, vocabulary padding
    dropped), so the export is a plain GPT2LMHeadModel with llmlab's logits."""
    from transformers import AutoModelForCausalLM

    from llmlab.export import export_run
    from tests.export.helpers import RUNS
    from tests.runs import torchrun_llmlab

    run_dir, out = tmp_path / "tp2", tmp_path / "tp2-export"
    args = ["run", "gpt-tp", "--preset", "smoke", "--device", "cpu", "--out", str(run_dir), "parallel.tp=2"]
    torchrun_llmlab([*args, *RUNS["gpt-tp"]], nproc=2)
    assert read_json(run_dir / "result.json")["world_size"] == 2
    export_run(run_dir, out)
    ours = Generator.from_run(run_dir).model
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=TOL)
    assert "torchrun --nproc_per_node 2 -m llmlab run gpt-tp" in (out / "README.md").read_text()
