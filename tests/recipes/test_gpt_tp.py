"""gpt-tp (llmlab/recipes/gpt_tp.py) under torchrun on gloo: TP = 2, TP 2 × DP 2 and PyTorch's DTensor engine
take the steps of one process on the same global batches; a TP checkpoint resumes on one process; the saved
model is the single-device GPT (and, through the stage-6 converter, HF's GPT-2); the communication figures in
metrics.jsonl are the exact count; layouts that cannot be built are refused before any process group.

Tolerances: the runs differ from the 1-process run only by the order of float32 sums (a row-parallel product
is p partial dot products added by the all-reduce; DP averages half-batch gradients). Measured over 16 steps:
losses within 1e-6 and gradient norms within 3e-6 relative, final weights within 1e-6 in relative norm; the
limits (1e-4 / 1e-4 / 1e-5) leave 10-100x. The bugs they must catch move things by far more: a DP sum instead
of an average doubles the logged gradient norm; a missing f or g changes the step-2 loss by > 1e-2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.runner import run
from tests.runs import relative_diff, torchrun, torchrun_llmlab, train_rows

TP_ARGS = ["train.max_steps=16", "train.log_every=1", "train.eval_every=8", "train.checkpoint_every=8"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp1") / "run"
    run("gpt-tp", "smoke", TP_ARGS, out=out, device="cpu")
    return out


def _rows(run_dir: Path) -> list[dict]:
    return train_rows(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "extra"),
    [(2, ["parallel.tp=2"]), (4, ["parallel.tp=2"]), (2, ["parallel.tp=2", "parallel.engine=dtensor"])],
    ids=["tp2", "tp2xdp2", "dtensor-tp2"],
)
def test_tensor_parallel_runs_take_the_steps_of_one_process(one_process_run, tmp_path, capsys, nproc, extra):
    from llmlab.train.checkpoint import load_weights

    out = tmp_path / "run"
    args = ["run", "gpt-tp", "--preset", "smoke", "--device", "cpu", *TP_ARGS, *extra, "--out", str(out)]
    torchrun_llmlab(args, nproc=nproc)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == nproc
    a, b = _rows(one_process_run), _rows(out)
    assert len(a) == len(b) == 16
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x["step"], x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), (x["step"], x["grad_norm"])
        assert y["throughput"] > 0 and y["step_s"] > 0
    wa, wb = load_weights(one_process_run / "model.safetensors"), load_weights(out / "model.safetensors")
    assert wa.keys() == wb.keys() and relative_diff(wa, wb) < 1e-5
    last = b[-1]
    assert (last["comm_dp_s"] > 0) == (nproc == 4)  # the DP all-reduce only with 2 replicas
    if "parallel.engine=dtensor" in extra:
        assert "comm_tp_s" not in last  # inside DTensor: not timed, and not claimed to be 0
    else:
        assert last["comm_tp_s"] > 0 and last["compute_s"] > 0 and 0 < last["comm_share"] < 1
        # every byte the TP all-reduces moved is accounted for: 4 per layer (Megatron), embedding and head
        assert last["tp_allreduce_bytes"] == last["tp_allreduce_bytes_theory"]
        assert last["tp_allreduce_bytes_megatron"] < last["tp_allreduce_bytes_theory"]
        # DP: one flat all-reduce of this rank's gradients (half of the model's matrices under TP 2)
        assert (last["dp_allreduce_bytes"] > 0) == (nproc == 4)
    if nproc == 2 and "parallel.engine=dtensor" not in extra:  # a TP 2 run evaluates on one process
        capsys.readouterr()
        assert main(["eval", str(out), "--split", "val"]) == 0
        printed = capsys.readouterr().out
        metrics = json.loads(printed[printed.rindex("{\n") :])
        assert metrics["val/loss"] == pytest.approx(result["metrics"]["val/loss"], rel=1e-5)
    section = (out / "sections" / "parallel.md").read_text()
    assert f"TP 2 × DP {nproc // 2}" in section
    assert (out / "parallel.png").is_file() == ("parallel.engine=dtensor" not in extra)
    assert "Tensor parallelism" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_tp_checkpoint_resumes_on_one_process_and_exports_to_hf(one_process_run, tmp_path):
    """Interrupted after step 8 of a TP 2 run (its last checkpoint dropped), resumed with parallel.tp=1 on one
    process: the checkpoint holds the whole GPT and whole AdamW moments, so the run ends where the
    uninterrupted 1-process run does (float32 order only, as above). The saved weights are the stage-6 GPT's:
    they load into it, and its HF export gives HF's GPT2LMHeadModel the same logits."""
    from transformers import GPT2LMHeadModel

    from llmlab.models.gpt import GPT, save_hf
    from llmlab.recipes import get_recipe
    from llmlab.runner import load_run_config, load_run_weights
    from llmlab.train.checkpoint import load_weights

    out = tmp_path / "run"
    args = ["run", "gpt-tp", "--preset", "smoke", "--device", "cpu", *TP_ARGS, "parallel.tp=2"]
    torchrun_llmlab([*args, "--out", str(out)], nproc=2)
    (out / "checkpoints" / "latest").unlink()
    shutil.rmtree(out / "checkpoints" / "step_00000016")
    assert main(["run", "gpt-tp", "--preset", "smoke", "--device", "cpu", *TP_ARGS, "parallel.tp=1",
                 "--out", str(out), "--resume"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["resumed_from_engine"] == [{"parallel.tp": 2}] and config["config"]["parallel"]["tp"] == 1
    wa, wb = load_weights(one_process_run / "model.safetensors"), load_weights(out / "model.safetensors")
    assert relative_diff(wa, wb) < 1e-5
    assert _rows(out)[-1]["loss"] == pytest.approx(_rows(one_process_run)[-1]["loss"], rel=1e-4)

    recipe, cfg, _ = load_run_config(out)
    assert recipe is get_recipe("gpt-tp")
    tok_size = json.loads((out / "result.json").read_text())["n_params"]  # the whole model's count
    model = GPT(recipe.model_config(cfg, out, _tokenizer(out)))
    load_run_weights(out, model)
    assert model.n_params == tok_size
    save_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.eval()(idx), rtol=1e-5, atol=1e-5)
    assert main(["generate", str(out), "The", "--max-new-tokens", "8"]) == 0


def _tokenizer(run_dir: Path):
    from llmlab.data.lm_tokenizers import load_text_tokenizer

    return load_text_tokenizer(run_dir / "tokenizer.json")


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("parallel.tp=2", "number of processes (1"),  # one process cannot hold a TP 2 model
        ("parallel.tp=3", "model.n_head=4"),  # nor does 3 divide the heads, the MLP or the padding
        ("parallel.pad_vocab_multiple=0", "pad_vocab_multiple"),
        ("parallel.engine=megatron", "engine"),
        ("train.strategy=zero2", "train.strategy=zero2"),
    ],
)
def test_layouts_that_cannot_be_built_are_refused_before_anything_starts(tmp_path, capsys, override, says):
    out = tmp_path / "run"
    assert main(["run", "gpt-tp", "--preset", "smoke", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_tp_that_does_not_fit_says_what_would():
    from llmlab.config import ConfigError
    from llmlab.parallel.layout import check_tp_layout

    with pytest.raises(ConfigError) as info:
        check_tp_layout(3, 4, n_head=12, n_embd=768, pad_vocab_multiple=128)
    msg = str(info.value)
    assert "number of processes (4" in msg and "pad_vocab_multiple=128" in msg and "fit" in msg
    assert "1, 2, 4" in msg  # the sizes that divide 4 processes, 12 heads, 3072 and 128
    check_tp_layout(2, 4, n_head=12, n_embd=768, pad_vocab_multiple=128)  # fits: no error


@pytest.mark.slow
def test_under_torchrun_a_bad_layout_fails_fast_with_exit_2(tmp_path):
    """Each rank refuses the config before joining a process group: torchrun reports exit code 2 of its
    workers, the message names the quantity, and no run directory appears."""
    out = tmp_path / "run"
    cmd = [*torchrun(2), "-m", "llmlab", "run", "gpt-tp", "--preset", "smoke", "parallel.tp=2",
           "model.n_head=3", "model.n_embd=24", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "model.n_head=3" in done.stderr and "exitcode  : 2" in done.stderr
    assert not out.exists()
