"""Stage 7 `llama-lora` end to end, from a `llama-pretrain` smoke run onto another text with the same
characters (the smoke prose, every sentence written backwards: new bigrams to learn):
- LoRA: the val loss falls from the init's, the run keeps only the adapter (PEFT's format), the init's weights
  stay bit-identical, `llmlab eval` rebuilds init + adapter to the recorded loss, PEFT loads the adapter onto
  the init exported to HF with our logits, and the merged HF export gives them too;
- QLoRA: trains on the NF4 base and measures merging back into it;
- full fine-tuning: the baseline, all weights saved;
- clear errors, nothing written.
Float32 models: logits of the same function computed in another order (merged weights vs W x + s·B(A x),
HF's kernels vs ours) agree to ~1e-6; 1e-4 catches a lost update (the adapter moves logits by > 1e-2) or
an unpermuted q/k adapter (~1e-1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.recipes.gpt_lm import SYNTHETIC, Generator
from llmlab.runner import evaluate_run, run

LOGIT_TOL = 1e-4  # see module docstring
SHORT = ["train.max_steps=60", "train.eval_every=30", "train.log_every=10", "samples.count=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama-base") / "run"
    result = run("llama-pretrain", "smoke", ["samples.count=0"], out=out, device="cpu")
    assert result["status"] == "completed"
    return out


@pytest.fixture(scope="module")
def target_text(tmp_path_factory) -> Path:
    """The smoke prose with every sentence reversed: the same characters in another order."""
    make, _ = SYNTHETIC["synthetic-zh"]
    lines = []
    for para in make().splitlines():
        sentences = para.rstrip("。").split("，")
        lines.append("，".join(s[::-1] for s in sentences) + "。")
    path = tmp_path_factory.mktemp("target") / "reversed.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _args(base_run: Path, target_text: Path, *extra: str) -> list[str]:
    return [f"init_from={base_run}", f"data.corpus={target_text}", *SHORT, *extra]


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lora_run(base_run, target_text, tmp_path_factory) -> Path:
    before = _sha(base_run / "model.safetensors")
    out = tmp_path_factory.mktemp("lora") / "run"
    result = run("llama-lora", "smoke", _args(base_run, target_text, "finetune.export_merged=true"), out=out,
                 device="cpu")  # fmt: skip
    assert result["status"] == "completed"
    assert _sha(base_run / "model.safetensors") == before  # the init's weights are untouched
    return out


def test_lora_lowers_the_loss_and_keeps_only_the_adapter(lora_run, base_run):
    result = json.loads((lora_run / "result.json").read_text())
    m = result["metrics"]
    assert m["val/loss"] < m["val/loss_before"] - 0.1, m
    # r=4 on the 7 linear layers of 2 blocks: 4·(in + out) each
    per_block = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert m["model/trainable_params"] == 2 * per_block
    assert not (lora_run / "model.safetensors").exists()
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base_run.resolve())
    init = json.loads((lora_run / "init.json").read_text())
    assert len(init["base_sha256"]) == 64
    # the checkpoint holds the frozen base as trained: bit-identical to the init's weights
    from safetensors.torch import load_file

    base = load_file(str(base_run / "model.safetensors"))
    ckpt = sorted((lora_run / "checkpoints").glob("step_*"))[-1]
    trained = load_file(str(ckpt / "model.safetensors"))
    for name, w in base.items():
        key = name.replace(".weight", ".base_layer.weight") if name not in trained else name
        assert torch.equal(trained[key], w), name


def test_eval_and_generate_rebuild_init_plus_adapter(lora_run, capsys):
    recorded = json.loads((lora_run / "result.json").read_text())["metrics"]["val/loss"]
    assert evaluate_run(lora_run, split="val", device="cpu")["loss"] == pytest.approx(recorded, abs=1e-5)
    args = ["generate", str(lora_run), "却说", "--max-new-tokens", "10", "--seed", "1", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)


def test_adapter_loads_in_peft_onto_the_init_and_the_merged_export_agrees(lora_run, base_run, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llmlab.models.llama import save_hf

    ours = Generator.from_run(lora_run).model  # init + adapter, merged
    base = Generator.from_run(base_run).model
    save_hf(base, tmp_path / "base-hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, lora_run / "adapter").eval()
    ids = _ids(base.cfg.vocab_size)
    with torch.no_grad():
        expected = ours(ids)
        assert (peft_model(ids).logits - expected).abs().max() < LOGIT_TOL
        assert (base(ids) - expected).abs().max() > 1e-2  # the adapter does change the model
        merged = transformers.LlamaForCausalLM.from_pretrained(lora_run / "merged").eval()
        assert (merged(ids).logits - expected).abs().max() < LOGIT_TOL


def test_qlora_trains_on_nf4_and_measures_merging_back(base_run, target_text, tmp_path):
    out = tmp_path / "qlora"
    result = run("llama-lora", "smoke", _args(base_run, target_text, "finetune.method=qlora"), out=out,
                 device="cpu")  # fmt: skip
    m = result["metrics"]
    assert m["val/loss"] < m["val/loss_before"] - 0.1, m
    # merged into float32 weights = the trained model (dequantized base + update), up to rounding
    assert m["val/loss_merged_fp32"] == pytest.approx(m["val/loss"], abs=1e-4)
    assert m["merge/nf4_error_over_update"] > 0
    assert "val/loss_merged_nf4" in m
    assert "re-quantization error" in " ".join(result["notes"])
    assert evaluate_run(out, split="val", device="cpu")["loss"] == pytest.approx(m["val/loss"], abs=1e-5)


def test_full_finetune_saves_every_weight(base_run, target_text, tmp_path):
    out = tmp_path / "full"
    result = run("llama-lora", "smoke", _args(base_run, target_text, "finetune.method=full"), out=out,
                 device="cpu")  # fmt: skip
    m = result["metrics"]
    assert m["val/loss"] < m["val/loss_before"] - 0.1
    assert m["model/trainable_fraction"] == 1.0
    assert (out / "model.safetensors").exists() and not (out / "adapter").exists()
    assert evaluate_run(out, split="val", device="cpu")["loss"] == pytest.approx(m["val/loss"], abs=1e-5)


def test_clear_errors(base_run, target_text, tmp_path, capsys):
    def fails(args: list[str], match: str) -> None:
        out = tmp_path / "out"
        assert main(["run", "llama-lora", "--out", str(out), "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err
        assert not out.exists()  # refused before anything was written

    smoke = ["--preset", "smoke", *_args(base_run, target_text)]
    fails(["--preset", "zh-poetry"], "llama-lora needs init_from=")
    fails([*smoke, "data.unknown_chars=extend"], "new embedding rows would stay frozen")
    fails([*smoke, 'lora.target_modules=["q_proj","nope"]'], "nope")
    fails([*smoke, "model.hidden_size=64"], "model.hidden_size=64 (the init's: 32)")
    fails([*smoke, "finetune.method=dora"], "finetune.method")


def test_a_damaged_adapter_is_a_clear_error(lora_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy, ignore=shutil.ignore_patterns("checkpoints", "merged", "tb"))
    weights = copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert main(["eval", str(copy), "--split", "val", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "its adapter cannot be loaded" in err and "Traceback" not in err, err
