"""Stage 6 Chinese recipes end to end: `gpt-pretrain` (smoke), then `gpt-finetune` from its run directory
(the init's weights really are loaded: the loss before fine-tuning is the pretrain run's own val loss), from
a Hugging Face GPT-2 directory (BERT vocab.txt as uer/gpt2-chinese, or tokenizer.json), the vocabulary
mismatch policies, clear errors (no traceback, nothing written), and a few steps on the real novels/poems."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.config import ConfigError
from llmlab.recipes.gpt_lm import SYNTHETIC
from llmlab.runner import run
from tests.runs import torchrun

SHORT = ["train.max_steps=20", "train.eval_every=20", "train.log_every=10", "samples.count=0"]


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    result = run("gpt-pretrain", "smoke", out=out, device="cpu")
    assert result["status"] == "completed" and result["target"]["met"], result["metrics"]
    return out


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def test_pretrain_smoke_records_chinese_samples(pretrain_run):
    report = (pretrain_run / "report.md").read_text()
    assert "## Samples" in report and "'却说'" in report
    assert json.loads((pretrain_run / "tokenizer.json").read_text())["kind"] == "char"


def test_finetune_starts_from_the_run_weights(pretrain_run, tmp_path, capsys):
    """Same text and split as the pretrain run: the loss before fine-tuning is the pretrain run's final val
    loss (same weights, same windows; only float summation order may differ). Afterwards the run stands on
    its own record: with the init deleted, `llmlab eval`, `--resume` and `llmlab generate` still work."""
    import shutil

    from llmlab.runner import evaluate_run

    init, out = tmp_path / "init", tmp_path / "same"
    shutil.copytree(pretrain_run, init)
    overrides = [f"init_from={init}", "data.corpus=synthetic-zh", *SHORT, "train.checkpoint_every=10"]
    result = run("gpt-finetune", "smoke", overrides, out=out, device="cpu")
    before = result["metrics"]["val/loss_before"]
    assert before == pytest.approx(_result(pretrain_run)["metrics"]["val/loss"], rel=1e-6)
    assert result["metrics"]["val/ppl_before"] == pytest.approx(math.exp(before), rel=1e-6)
    saved = json.loads((out / "init.json").read_text())
    assert saved["kind"] == "run" and saved["model"]["n_layer"] == 2
    assert any("Initialised from the gpt-pretrain run" in n for n in result["notes"])

    shutil.rmtree(init)
    again = evaluate_run(out, "val", device="cpu")
    assert again["loss"] == pytest.approx(result["metrics"]["val/loss"], rel=1e-6)
    assert again["loss_before"] == pytest.approx(before)
    resumed = run("gpt-finetune", "smoke", overrides, out=out, device="cpu", resume=True)
    assert resumed["metrics"]["val/loss_before"] == pytest.approx(before)
    assert resumed["metrics"]["val/loss"] == pytest.approx(result["metrics"]["val/loss"], rel=1e-6)
    # a fine-tune run is itself a language-model run: `llmlab generate` samples it
    assert main(["generate", str(out), "却说", "--max-new-tokens", "10", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["samples"][0]) == 10


def test_finetune_onto_poems_extends_the_vocabulary_and_the_loss_falls(pretrain_run, tmp_path):
    out = tmp_path / "poems"
    overrides = [f"init_from={pretrain_run}", "data.unknown_chars=extend"]
    result = run("gpt-finetune", "smoke", overrides, out=out, device="cpu")
    m = result["metrics"]
    # before: the prose model meets 14 characters it has never seen (mean embedding rows); after 100 steps
    # it writes quatrains (measured: 4.25 -> 2.22; the text's character frequencies alone give ~2.6)
    assert m["val/loss"] < m["val/loss_before"] - 1.5
    assert any("added to the vocabulary" in n and "39 → 53" in n for n in result["notes"])
    report = (out / "report.md").read_text()
    assert "Before fine-tuning (the init model)" in report and "After fine-tuning" in report
    assert "val/loss_before" in report
    tok = json.loads((out / "tokenizer.json").read_text())
    assert set(SYNTHETIC["synthetic-zh-poems"][0]()) <= set(tok["chars"])


def test_extended_embedding_keeps_the_old_logits(pretrain_run):
    from llmlab.data.lm_tokenizers import load_text_tokenizer
    from llmlab.recipes.gpt_finetune import extend_embedding, fit_vocabulary
    from llmlab.recipes.gpt_lm import Generator

    gen = Generator.from_run(pretrain_run)
    tok = load_text_tokenizer(pretrain_run / "tokenizer.json")
    fit = fit_vocabulary("山月风花雪，却说。", tok, "extend")
    grown = extend_embedding(gen.model, fit.old_to_new, fit.tokenizer.vocab_size).eval()
    text = "却说众人前来，大王说道"
    old_ids, new_ids = torch.tensor([tok.encode(text)]), torch.tensor([fit.tokenizer.encode(text)])
    with torch.no_grad():
        a, b = gen.model(old_ids), grown(new_ids)
    torch.testing.assert_close(b[..., fit.old_to_new], a)  # the old tokens' logits are unchanged
    new = sorted(set(range(fit.tokenizer.vocab_size)) - set(fit.old_to_new))
    w = grown.transformer.wte.weight
    torch.testing.assert_close(w[new], gen.model.transformer.wte.weight.mean(0).expand(len(new), -1))


def test_unknown_characters_error_or_drop(pretrain_run, tmp_path):
    with pytest.raises(ConfigError, match=r"14 distinct characters .* data.unknown_chars=extend"):
        run("gpt-finetune", "smoke", [f"init_from={pretrain_run}"], out=tmp_path / "e", device="cpu")
    assert not (tmp_path / "e").exists()
    overrides = [f"init_from={pretrain_run}", "data.unknown_chars=drop", *SHORT]
    result = run("gpt-finetune", "smoke", overrides, out=tmp_path / "d", device="cpu")
    assert any("dropped from the text" in n for n in result["notes"])
    known = set(json.loads((pretrain_run / "tokenizer.json").read_text())["chars"])
    kept = sum(c in known for c in SYNTHETIC["synthetic-zh-poems"][0]())  # "山", "人", punctuation, newlines
    assert f"({kept:,} characters" in result["data"]


def _tiny_hf_gpt2(folder: Path, vocab_size: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(folder)


def _bert_vocab(chars: str) -> list[str]:
    """A toy BERT vocab.txt: the special tokens at their bert-base-chinese ids, then `chars`."""
    unused = [f"[unused{i}]" for i in range(1, 100)]
    return ["[PAD]", *unused, "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(chars))]


def test_finetune_from_an_hf_directory_with_a_bert_vocab(tmp_path):
    """As uer/gpt2-chinese: GPT2LMHeadModel weights + a BERT vocab.txt. The loss before fine-tuning equals
    transformers' own loss of that model on the same validation windows."""
    from transformers import GPT2LMHeadModel

    from llmlab.data.lm_tokenizers import load_text_tokenizer

    hf = tmp_path / "hf"
    vocab = _bert_vocab("山月风花雪春秋江水云人归远明夜舟，。")
    _tiny_hf_gpt2(hf, len(vocab))
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    out = tmp_path / "ft"
    overrides = [f"init_from={hf}", "train.max_steps=60"]  # the smoke's architecture
    with pytest.raises(ConfigError, match="empty under the bert-wordpiece tokenizer"):  # BERT drops "\n"
        run("gpt-finetune", "smoke", overrides, out=out, device="cpu")
    overrides += ["samples.prompt=山"]
    result = run("gpt-finetune", "smoke", overrides, out=out, device="cpu")
    m = result["metrics"]
    assert m["val/loss"] < m["val/loss_before"] - 1.0
    assert json.loads((out / "init.json").read_text())["kind"] == "hf"
    assert any("0 of 30,000 characters (0.00%) of the target text become [UNK]" in n for n in result["notes"])

    # transformers on the same windows: the validation split's tokens in consecutive 32-token windows
    tok = load_text_tokenizer(out / "tokenizer.json")
    text = SYNTHETIC["synthetic-zh-poems"][0]()
    ids = torch.tensor(tok.encode(text[int(len(text) * 0.9) :]))
    n = (len(ids) - 1) // 32
    x = torch.stack([ids[i * 32 : i * 32 + 32] for i in range(n)])
    y = torch.stack([ids[i * 32 + 1 : i * 32 + 33] for i in range(n)])
    model = GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        logits = model(x).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert m["val/loss_before"] == pytest.approx(ref, rel=1e-5)


def test_finetune_from_an_hf_directory_with_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmlab.data.lm_tokenizers import PretrainedTokenizer

    text = SYNTHETIC["synthetic-zh-poems"][0]()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    hf = tmp_path / "hf"
    _tiny_hf_gpt2(hf, tok.get_vocab_size())
    tok.save(str(hf / "tokenizer.json"))
    # vocab.json + merges.txt (GPT-2's slow files) give the same tokenizer
    tok.model.save(str(tmp_path))
    slow = PretrainedTokenizer.from_bpe_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert slow.encode(text[:500]) == tok.encode(text[:500]).ids
    assert slow.decode(slow.encode(text[:500])) == text[:500]

    overrides = [f"init_from={hf}", *SHORT]
    result = run("gpt-finetune", "smoke", overrides, out=tmp_path / "ft", device="cpu")
    assert result["metrics"]["val/loss"] < result["metrics"]["val/loss_before"]
    saved = json.loads((tmp_path / "ft" / "tokenizer.json").read_text())
    assert saved["kind"] == "pretrained"


def test_clear_errors(pretrain_run, tmp_path, capsys, monkeypatch):
    def fails(args: list[str], match: str) -> None:
        out = tmp_path / "out"
        assert main(["run", "gpt-finetune", "--out", str(out), "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err
        assert not out.exists()  # refused before anything was written

    poetry = ["--preset", "zh-poetry", "train.strategy=ddp"]
    fails(poetry, "gpt-finetune needs init_from=")
    fails([*poetry, f"init_from={tmp_path / 'nope'}"], "no such directory")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"recipe": "mnist-mlp", "preset": "digits", "config": {}}))
    fails([*poetry, f"init_from={other}"], "not a language model")
    (tmp_path / "empty").mkdir()
    fails([*poetry, f"init_from={tmp_path / 'empty'}"], "no config.json")
    smoke = ["--preset", "smoke", f"init_from={pretrain_run}"]
    fails([*smoke, "model.n_layer=3"], "model.n_layer=3 (the init's: 2): a fine-tune keeps the architecture")
    fails([*smoke, "data.tokenizer=bpe"], "data.tokenizer=bpe: a fine-tune uses the tokenizer")
    fails(["--preset", "smoke", "init_from="], "gpt-finetune needs init_from=")
    fails([*smoke, "data.unknown_chars=extend", "data.block_size=64"], "longer than the model's context")

    # a Hub id with the network failing (as here, offline): one clear message naming the id
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot reach https://huggingface.co (offline)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    fails([*poetry, "init_from=gpt2"], "init_from=gpt2: no local directory")
    fails(
        [*poetry, "init_from=gpt2"], "the Hugging Face Hub is unreachable from here (LocalEntryNotFoundError"
    )


@pytest.mark.slow
def test_real_novels_then_tang_poems(shared_data, tmp_path):
    """A few steps of the real presets: gpt-pretrain cpu on the novels, then gpt-finetune zh-poetry on the
    Tang poems (under ddp on one process here; the preset's DeepSpeed needs torchrun)."""
    pre = tmp_path / "pre"
    few = ["train.max_steps=20", "train.eval_every=20", "data.eval_batches=4", "samples.count=1"]
    few += ["samples.max_new_tokens=20"]
    result = run("gpt-pretrain", "cpu", few, out=pre, device="cpu", data_dir=shared_data)
    assert "3,022,735 characters" in result["data"]
    assert result["metrics"]["val/loss_per_char"] < 7.0  # from ~ln(vocab): 8.8 (char), 10 (bert-chinese)
    ft = tmp_path / "ft"
    overrides = [f"init_from={pre}", "train.strategy=ddp", *few]
    result = run("gpt-finetune", "zh-poetry", overrides, out=ft, device="cpu", data_dir=shared_data)
    m = result["metrics"]
    assert m["val/loss"] < m["val/loss_before"]
    assert "tang_poems" in result["data"]
    assert "Before fine-tuning" in (ft / "report.md").read_text()


@pytest.mark.slow
def test_finetune_under_deepspeed_zero2_on_two_processes(pretrain_run, tmp_path):
    """The zh-poetry setting in small: `train.strategy=deepspeed train.ds_stage=2` on 2 gloo processes under
    torchrun. The loss before fine-tuning (every process its half of the windows, summed) is the one-process
    figure, and training lowers it."""
    import os
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("deepspeed")
    from llmlab.train.strategy import STRATEGIES

    if "deepspeed" not in STRATEGIES:
        pytest.skip("train.strategy=deepspeed is not available in this llmlab")
    args = ["--preset", "smoke", "--device", "cpu", f"init_from={pretrain_run}", "data.unknown_chars=extend"]
    args += ["train.max_steps=20", "train.eval_every=20", "samples.count=1"]
    env = {**os.environ, "LLMLAB_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [
        *torchrun(2),
        "-m",
        "llmlab",
        "run",
        "gpt-finetune",
        *args,
        "train.strategy=deepspeed",
        "train.ds_stage=2",
    ]
    cmd += ["--out", str(tmp_path / "ds")]
    with ThreadPoolExecutor(max_workers=1) as pool:  # the 1-process run goes while the launch starts up
        launched = pool.submit(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=600)
        one = run("gpt-finetune", "smoke", args[4:], out=tmp_path / "one", device="cpu")
        done = launched.result()
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(tmp_path / "ds")
    assert result["world_size"] == 2 and result["status"] == "completed"
    m = result["metrics"]
    assert m["val/loss_before"] == pytest.approx(one["metrics"]["val/loss_before"], rel=1e-6)
    assert m["val/loss"] < m["val/loss_before"] - 0.5
    assert "After fine-tuning" in (tmp_path / "ds" / "report.md").read_text()
