"""Stage 6 language-model recipe end to end: the smoke run's record (tokenizer, per-character loss, samples
in the report), `llmlab generate` as its help text describes it, clear errors, and real TinyShakespeare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.runner import run
from tests.runs import relative_diff, torchrun_llmlab, train_rows


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "run"
    result = run("shakespeare-gpt", "smoke", out=out, device="cpu")
    assert result["status"] == "completed" and result["target"]["met"]
    return out


def test_smoke_run_records_tokenizer_losses_and_samples(lm_run):
    result = json.loads((lm_run / "result.json").read_text())
    m = result["metrics"]
    assert m["val/loss_per_char"] == pytest.approx(m["val/loss"])  # one character per token (char-level)
    assert m["val/ppl"] == pytest.approx(math.exp(m["val/loss"]))
    assert result["throughput"]["unit"] == "tokens/s"
    assert json.loads((lm_run / "tokenizer.json").read_text())["kind"] == "char"
    report = (lm_run / "report.md").read_text()
    assert "## Samples" in report and "```text" in report


def test_generate_is_reproducible_and_prints_json(lm_run, capsys):
    args = ["generate", str(lm_run), "The king", "--max-new-tokens", "50", "--seed", "3", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == first  # same seed, same text
    assert first[0]["prompt"] == "The king" and len(first[0]["samples"][0]) == 50  # 50 characters
    assert (
        main(
            [
                "generate",
                str(lm_run),
                "The",
                "a",
                "--num-samples",
                "2",
                "--temperature",
                "0",
                "--max-new-tokens",
                "80",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("-" * 60) == 4  # 2 prompts x 2 samples; 80 > the 32-token context: the window slid


def test_generate_errors_are_clear(lm_run, tmp_path, capsys):
    assert main(["generate", str(lm_run), "漢字"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    assert main(["generate", str(lm_run), "x", "--top-p", "1.5"]) == 2
    assert main(["generate", str(tmp_path / "none"), "x"]) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"recipe": "mnist-mlp", "preset": "digits", "config": {}}))
    assert main(["generate", str(other), "x"]) == 1
    assert "not a language model" in capsys.readouterr().err
    assert main(["config", "shakespeare-gpt", "model.vocab_size=-1"]) == 2


@pytest.mark.slow
def test_real_tinyshakespeare_loss_falls(shared_data, tmp_path):
    """nanoGPT's CPU model for 300 of its 2,000 steps on the real text: val loss falls from ln(65) = 4.17
    (uniform over the 65 characters) to below 2.6 (measured 2.3-2.4; a broken data path or model stays
    near 3.3, the loss of character unigram frequencies)."""
    out = tmp_path / "real"
    result = run(
        "shakespeare-gpt", "cpu", ["train.max_steps=300", "train.eval_every=150"], out=out, device="cpu",
        data_dir=shared_data,
    )  # fmt: skip
    assert result["metrics"]["val/loss"] < 2.6
    assert "65 entries" in " ".join(result["notes"]) and "1,115,394 characters" in result["data"]


def test_memory_switches_fp16_loss_scale_and_activation_checkpointing(tmp_path):
    """The precision and checkpointing switches of the config run end to end: fp16 under autocast logs its
    dynamic loss scale; activation checkpointing on a model without it is a clear config error."""
    out = tmp_path / "fp16"
    overrides = ["train.max_steps=20", "train.log_every=10", "train.precision=fp16"]
    overrides += ["train.activation_checkpointing=true"]
    result = run("shakespeare-gpt", "smoke", overrides, out=out, device="cpu")
    assert result["precision"] == "fp16"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in rows if r["split"] == "train"]
    assert len(scales) == 2 and all(s > 0 for s in scales)
    args = ["run", "mnist-mlp", "--preset", "smoke", "--out", str(tmp_path / "m")]
    assert main([*args, "train.activation_checkpointing=true"]) == 2
    assert not (tmp_path / "m").exists()  # refused before anything was written


ZERO_ARGS = ["train.max_steps=20", "train.log_every=1", "train.eval_every=10", "train.checkpoint_every=10"]
ZERO_ARGS += ["optim.lr=1e-3"]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run_dir)]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run("shakespeare-gpt", "smoke", ZERO_ARGS, out=out, device="cpu")
    return out


ZERO_RUN = ["run", "shakespeare-gpt", "--preset", "smoke", "--device", "cpu", *ZERO_ARGS]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    """The uninterrupted zero2 run on 2 processes, launched once for the two tests that start from it; each
    works on its own copy (they drop its last checkpoint and resume)."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    torchrun_llmlab([*ZERO_RUN, "train.strategy=zero2", "--out", str(out)])
    return out


def _zero_run(strategy: str, out: Path, request: pytest.FixtureRequest) -> None:
    """The uninterrupted run of `strategy` on 2 processes in `out` (zero2: a copy of the shared one)."""
    import shutil

    if strategy == "zero2":
        shutil.copytree(request.getfixturevalue("zero2_run"), out)
    else:
        torchrun_llmlab([*ZERO_RUN, f"train.strategy={strategy}", "--out", str(out)])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_our_zero_under_torchrun_takes_the_steps_of_one_process_and_resumes(
    one_process_run, tmp_path, strategy, request
):
    """`train.strategy=zeroN` on 2 gloo processes follows the 1-process run (same global batches) and leaves
    a whole model.safetensors; a run resumed from its step-10 checkpoint (full weights and the gathered
    optimizer state) ends bit for bit where the uninterrupted one did. Tolerances: float32 sums in another
    order (all-reduce / reduce-scatter of half-batch gradients); measured over 20 steps, every stage: losses
    within 2.4e-7, weights within 2.3e-7 in relative norm; the limits 1e-5 leave 40x. Stepping on the half
    batch one rank sees alone moves both by 2e-2 (measured)."""
    from llmlab.train.checkpoint import load_weights

    out = tmp_path / strategy
    _zero_run(strategy, out, request)
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["status"] == "completed"
    la, lb = _losses(one_process_run), _losses(out)
    assert len(la) == len(lb) == 20
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 1e-5
    a, b = load_weights(one_process_run / "model.safetensors"), load_weights(out / "model.safetensors")
    assert a.keys() == b.keys() and relative_diff(a, b) < 1e-5
    # Interrupt after step 10 (drop the last checkpoint), resume under the same strategy: bit for bit.
    import shutil

    ckpts = out / "checkpoints"
    (ckpts / "latest").unlink()
    shutil.rmtree(ckpts / "step_00000020")
    torchrun_llmlab([*ZERO_RUN, f"train.strategy={strategy}", "--out", str(out), "--resume"])
    c = load_weights(out / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_strategy_errors_are_clear(tmp_path, capsys):
    assert main(["config", "shakespeare-gpt", "train.strategy=zero9"]) == 2
    assert "zero9" in capsys.readouterr().err
    # ZeRO shards over processes: on one process it says how to launch
    code = main(["run", "shakespeare-gpt", "--preset", "smoke", "--out", str(tmp_path / "z")]
                + ["train.strategy=zero2"])  # fmt: skip
    assert code == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_zero_checkpoint_resumes_under_another_number_of_processes(one_process_run, zero2_run, tmp_path):
    """ZeRO checkpoints hold the full weights and the full optimizer state, so a zero2 run interrupted on 2
    processes continues on 4 and ends where the 1-process run does (float32 reduction order only: the same
    2.4e-7-scale differences as above, limit 1e-5)."""
    import shutil

    from llmlab.train.checkpoint import load_weights

    out = tmp_path / "moved"
    shutil.copytree(zero2_run, out)  # the zero2 run on 2 processes
    (out / "checkpoints" / "latest").unlink()
    shutil.rmtree(out / "checkpoints" / "step_00000020")
    torchrun_llmlab([*ZERO_RUN, "train.strategy=zero2", "--out", str(out), "--resume"], nproc=4)
    assert json.loads((out / "result.json").read_text())["world_size"] == 4
    a, b = load_weights(one_process_run / "model.safetensors"), load_weights(out / "model.safetensors")
    assert relative_diff(a, b) < 1e-5
    assert (
        max(abs(x - y) for x, y in zip(_losses(one_process_run)[10:], _losses(out)[-10:], strict=True)) < 1e-5
    )
