"""llmlab/memory/measure.py on one process: the saved-tensor meter counts storages once, leaves parameters
out, follows releases; `state_bytes` counts parameter, gradient and optimizer-state storages once (tied
weights, views); after one real optimizer step the prediction equals the measurement exactly."""

from __future__ import annotations

import torch
from torch import nn

from llmlab.memory.measure import SavedTensorMeter, rss_peak_bytes, state_bytes
from llmlab.memory.predict import predict_memory
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.train.config import OptimConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.tasks import CausalLMTask

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_meter_counts_a_storage_once_and_skips_parameters():
    lin = nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)  # [4, 8] 128 bytes
    with SavedTensorMeter(lin.parameters(), record=True) as meter:
        y = (lin(x) * x).sum()  # linear saves x and W; mul saves x (again) and lin(x)
        assert meter.current["activation"] == 2 * 128  # x once, lin(x) once; W is a parameter
        y.backward()
    assert meter.peak_activations == 256 and meter.current["activation"] == 0
    assert sorted(r.shape for r in meter.records) == [(4, 8), (4, 8)]


def test_meter_counts_views_by_their_storage():
    x = torch.randn(10, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        (x[:2].exp().sum() + x[5:].exp().sum()).backward()  # exp saves its (distinct) results
    assert meter.peak_activations == 2 * 10 * 4 + 5 * 10 * 4


def test_autocast_weight_casts_are_param_copies():
    lin = nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)  # a leaf, but not a parameter: its cast is an activation
    with SavedTensorMeter(lin.parameters()) as meter, torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum().backward()
    assert meter.peak_param_copies == 16 * 16 * 2  # the bf16 weight; the input cast is an activation
    assert meter.peak_activations == 4 * 16 * 2


def test_state_bytes_tied_weights_grads_and_adam():
    model = GPT(CFG)
    psi = sum(p.numel() for p in model.parameters())  # the tied head once
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert state_bytes(model, opt).total == 4 * psi
    x = torch.randint(0, 50, (2, 16))
    CausalLMTask().step(model, (x, x)).loss.backward()
    opt.step()
    n = len(list(model.parameters()))
    sb = state_bytes(model, opt)
    assert (sb.params, sb.grads, sb.optimizer) == (4 * psi, 4 * psi, 8 * psi + 4 * n)


def _one_step(optim: OptimConfig, precision: str, checkpointing: bool):
    torch.manual_seed(0)
    model = GPT(CFG).train()
    model.set_activation_checkpointing(checkpointing)
    opt = build_optimizer(model, optim)
    x, y = torch.randint(0, 50, (2, 3, 16))  # [b, s] inputs and targets (distinct storages, as the loader's)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with SavedTensorMeter(model.parameters()) as meter:
        with amp:
            loss = CausalLMTask().step(model, (x, y)).loss
        loss.backward()
    opt.step()
    return state_bytes(model, opt), meter


def test_prediction_equals_measurement_single_process():
    for optim, kind in ((OptimConfig(name="adamw"), "adamw"), (OptimConfig(name="sgd", momentum=0.9), "sgd")):
        for precision, ckpt in (("fp32", False), ("bf16", True)):
            sb, meter = _one_step(optim, precision, ckpt)
            p = predict_memory(CFG, micro_batch=3, precision=precision, checkpointing=ckpt, optimizer=kind,
                               momentum=optim.momentum)  # fmt: skip
            s = p.states
            assert (sb.params, sb.grads, sb.optimizer) == (s.params, s.grads, s.optimizer)
            assert meter.peak_activations == p.activations.stored
            assert meter.peak_param_copies == p.activations.param_copies


def test_rss_is_bytes():
    assert rss_peak_bytes() > 10 * 2**20  # a Python process with torch holds more than 10 MiB
