"""MemoryProbe, the three calls a training loop makes, driven here by a loop written like the Trainer's step
(autocast forward + backward of the first micro-batch, optimizer step): memory.json holds predicted vs
measured per component within the issue's goals (states 5%, activations 15%; here they are exact), and the
report section it writes lands in a run's report.md."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from llmlab.memory import MemoryProbe
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.train.config import OptimConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import CausalLMTask

CFG = GPTConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def _train(probe: MemoryProbe, model: GPT, steps: int = 2, precision: str = "bf16") -> None:
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1))
    task = CausalLMTask()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = torch.randint(0, 40, (2, 4, 24))  # [b, s] inputs and targets, 4 sequences
        for i, micro in enumerate(zip(x.tensor_split(2), y.tensor_split(2), strict=True)):  # 2 micro-batches
            measure = probe.due(step) and i == 0
            with probe.activation_context(micro) if measure else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = task.step(model, micro)
                (out.loss / 2).backward()
        opt.step()
        if probe.due(step):
            probe.record_states(model, opt)


@pytest.mark.parametrize("precision, checkpointing", [("bf16", False), ("fp32", True)])
def test_probe_writes_memory_json_within_goals(tmp_path, precision, checkpointing):
    torch.manual_seed(0)
    model = GPT(CFG).train()
    model.set_activation_checkpointing(checkpointing)
    probe = MemoryProbe(model, precision=precision, step=1)
    _train(probe, model, precision=precision)
    record = probe.finish(tmp_path)
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert saved["measured"]["micro_batch_shape"] == [2, 24]
    rows = {r["component"]: r for r in saved["comparison"]}
    for key in ("params", "grads", "optimizer", "states"):
        assert abs(rows[key]["rel_error"]) <= 0.05 and rows[key]["goal"] == 0.05
        assert rows[key]["measured"] == rows[key]["predicted"]  # exact on this torch
    assert abs(rows["activations"]["rel_error"]) <= 0.15
    # The micro-batches are views of the rank's batch [4, 24] (as the Trainer's tensor_split makes them): the
    # embedding and the loss keep the whole int64 storages of x and y alive, 2 × 8 × (4 − 2) × 24 bytes more
    # than the micro-batch's own ids and targets the formula counts. Everything else is exact.
    assert rows["activations"]["measured"] == rows["activations"]["predicted"] + 2 * 8 * 2 * 24
    assert rows["param_copies"]["measured"] == rows["param_copies"]["predicted"]
    # autocast's 16-bit weight casts; in fp32 the stacked q/k/v weight (both recomputed under checkpointing)
    assert (rows["param_copies"]["predicted"] > 0) == (not checkpointing)
    assert saved["measured"]["rss_peak"] > 0 and saved["measured"]["cuda_max_allocated"] is None
    section = (tmp_path / "sections" / "memory.md").read_text()
    assert section.startswith("## Memory: predicted vs measured") and "+0.00%" in section
    assert record["predicted"]["strategy"] == "ddp"


def test_probe_for_trainer_reads_the_trainer():
    model = GPT(CFG)
    trainer = SimpleNamespace(
        cfg=TrainConfig(strategy="zero2"), raw_model=model, precision="bf16", device=torch.device("cpu"),
        dist=SimpleNamespace(world_size=4, rank=3),
    )  # fmt: skip
    probe = MemoryProbe.for_trainer(trainer, step=5)
    assert (probe.world_size, probe.rank, probe.step, probe.precision) == (4, 3, 5, "bf16")
    assert probe.due(5) and not probe.due(4)
    probe.batch_shape = (3, 24)
    p = probe.predict()
    assert p.strategy == "zero2" and p.ranks == 4 and p.activations.shape.batch == 3


def test_section_appears_in_the_run_report(tmp_path):
    """A real smoke run, then the probe's record in its directory: report.md carries the section."""
    from llmlab.memory.measure import write_memory_record
    from llmlab.memory.predict import predict_memory
    from llmlab.report import write_report
    from llmlab.runner import run

    out = tmp_path / "run"
    run("shakespeare-gpt", "smoke", ["train.max_steps=2", "train.eval_every=2", "samples.count=0"], out=out,
        device="cpu")  # fmt: skip
    cfg = GPTConfig(vocab_size=30, block_size=32, n_layer=2, n_head=2, n_embd=32)
    p = predict_memory(cfg, micro_batch=16)
    write_memory_record(out, p, {"params": p.states.params, "grads": p.states.grads}, step=0)
    report = write_report(out).read_text()
    assert "## Memory: predicted vs measured" in report


def test_probe_writes_nothing_when_its_step_never_ran(tmp_path):
    probe = MemoryProbe(GPT(CFG), precision="fp32", step=3)
    assert probe.finish(tmp_path) is None and not (tmp_path / "memory.json").exists()
