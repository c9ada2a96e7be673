"""Schedules against torch's own (OneCycleLR, CosineAnnealingLR) and the weight-decay grouping."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llmlab.train.config import OptimConfig, ScheduleConfig
from llmlab.train.optim import LRLambda, build_optimizer, build_scheduler


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _opt(lr=0.1):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_onecycle_equals_torch_onecycle():
    total, pct, div, final_div = 100, 0.25, 25.0, 1e4
    ref_opt = _opt()
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt,
        max_lr=0.1,
        total_steps=total,
        pct_start=pct,
        div_factor=div,
        final_div_factor=final_div,
        cycle_momentum=False,
    )
    ours_opt = _opt()
    ours = build_scheduler(
        ours_opt,
        ScheduleConfig(
            name="onecycle", warmup_frac=pct, start_ratio=1 / div, min_lr_ratio=1 / (div * final_div)
        ),
        total,
    )
    # Same formula evaluated in a different order of float operations: equal to ~1 ulp.
    torch.testing.assert_close(_lrs(ours, ours_opt, total), _lrs(ref, ref_opt, total), rtol=1e-12, atol=1e-15)


def test_cosine_without_warmup_equals_cosine_annealing():
    total = 50
    ref_opt = _opt()
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total, eta_min=0.001)
    ours_opt = _opt()
    ours = build_scheduler(ours_opt, ScheduleConfig(name="cosine", min_lr_ratio=0.01), total)
    torch.testing.assert_close(_lrs(ours, ours_opt, total), _lrs(ref, ref_opt, total), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_linear_warmup_then_shape(name):
    fn = LRLambda(name, total_steps=20, warmup_steps=5, start_ratio=0.0, min_lr_ratio=0.1)
    assert [fn(s) for s in range(6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    end = fn(20)
    assert end == pytest.approx(1.0 if name == "constant" else 0.1)


def test_scheduler_state_is_json_and_resumes_the_curve():
    opt = _opt()
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=3), 30)
    first = _lrs(sched, opt, 10)
    state = json.loads(json.dumps(sched.state_dict()))
    opt_state = opt.state_dict()  # the optimizer holds the current lr; a checkpoint restores both
    rest = _lrs(sched, opt, 5)
    opt2 = _opt()
    sched2 = build_scheduler(opt2, ScheduleConfig(name="constant"), 99)  # different: the state must win
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    assert _lrs(sched2, opt2, 5) == rest and len(first) == 10


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.1, decay_norm_and_bias=True))
    assert len(opt.param_groups) == 1


def test_manual_sgd_is_available_by_name():
    from llmlab.nn.manual import ManualSGD

    opt = build_optimizer(nn.Linear(2, 2), OptimConfig(name="manual_sgd", lr=0.1, nesterov=True))
    assert isinstance(opt, ManualSGD)


def test_noam_is_the_papers_formula_with_optim_lr_at_its_peak():
    d_model, warmup = 512, 4000
    peak = d_model**-0.5 * warmup**-0.5
    fn = LRLambda("noam", total_steps=10_000, warmup_steps=warmup, start_ratio=0.0, min_lr_ratio=0.0)
    for step in (0, 1, 99, 3998, 3999, 4000, 9999):
        s = step + 1  # the paper's step_num starts at 1
        paper = d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)
        assert peak * fn(step) == pytest.approx(paper, rel=1e-12)
    assert max(fn(s) for s in range(10_000)) == pytest.approx(1.0)
    assert peak == pytest.approx(6.988e-4, rel=1e-3)
    opt = _opt(lr=peak)
    sched = build_scheduler(opt, ScheduleConfig(name="noam", warmup_steps=warmup), 10_000)
    lrs = _lrs(sched, opt, 4001)
    assert lrs[3999] == pytest.approx(peak) and lrs[0] == pytest.approx(peak / warmup)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_fused_adam_the_auto_default_follows_the_for_loop_in_float64(name):
    """`impl=auto` picks torch's fused kernel (3.7x faster on this CPU); it must be the same update as the
    for-loop torch uses off CUDA. In float64 over 20 steps with weight decay the two differ only by
    rounding: 1e-16 relative measured, so 1e-13 catches any change to the update (a wrong bias
    correction or decay moves the weights by ~1e-4) while allowing a different summation order."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8)).double()
    b = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8)).double()
    b.load_state_dict(a.state_dict())
    cfg = {"name": name, "weight_decay": 0.1, "lr": 1e-2}
    loop = build_optimizer(a, OptimConfig(**cfg, impl="for-loop"))
    auto = build_optimizer(b, OptimConfig(**cfg))
    assert auto.defaults["fused"] is True and not loop.defaults["foreach"]
    for _ in range(20):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        loop.step()
        auto.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-13, atol=1e-15)


def test_fused_adam_is_not_forced_on_parameters_it_cannot_take():
    meta = nn.Linear(2, 2, device="meta")  # no fused kernel on the meta device: torch's default instead
    assert not build_optimizer(meta, OptimConfig(name="adamw")).defaults.get("fused")
    with pytest.raises(ValueError, match="impl"):
        OptimConfig(impl="fast")
