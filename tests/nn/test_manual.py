"""Tests for llmlab.nn.manual: every hand-derived backward against autograd and finite differences, ManualSGD
against torch.optim.SGD.

Tolerances: in float64 an exact formula and autograd differ only by rounding in a different summation
order, i.e. a few ulps of values of order 1-10 (~1e-15); 1e-10 leaves five orders of margin and would still
catch any wrong term. Finite differences use torch.autograd.gradcheck (central differences, eps=1e-6): its
truncation error is O(eps^2) ~ 1e-12 and its rounding error ~ 1e-16/eps ~ 1e-10, so atol=1e-7 is safe yet
far below the size of a real mistake (a missing factor or sign changes gradients by O(1)).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.nn.manual import (
    ManualLinear,
    ManualSGD,
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)

DT = torch.float64
GRAD_TOL = 1e-10  # see module docstring
FD_ATOL = 1e-7  # see module docstring


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# autograd.Function wrappers: they make gradcheck compare *our* backward with finite differences
# ----------------------------------------------------------------------------------------------------------
class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return linear_forward(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return linear_backward(dy, x, w)


class _ReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = relu_forward(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return relu_backward(dy, y)


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        y, mask = dropout_forward(x, p, True, _gen(seed))  # same seed at every evaluation -> same mask
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        return dropout_backward(dy, mask), None, None


class _SoftmaxCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, eps):
        loss, probs = softmax_cross_entropy_forward(logits, target, eps)
        ctx.save_for_backward(probs, target)
        ctx.eps = eps
        return loss

    @staticmethod
    def backward(ctx, dloss):
        probs, target = ctx.saved_tensors
        return softmax_cross_entropy_backward(probs, target, ctx.eps) * dloss, None, None


def _gradcheck(fn, inputs) -> None:
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=FD_ATOL, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------------
def test_linear_matches_autograd():
    g = _gen(1)
    x = torch.randn(7, 5, dtype=DT, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=DT, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=DT, generator=g, requires_grad=True)
    dy = torch.randn(7, 3, dtype=DT, generator=g)

    y_ref = F.linear(x, w, b)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    with torch.no_grad():
        y = linear_forward(x, w, b)
        dx, dw, db = linear_backward(dy, x, w)
    assert not y.requires_grad  # no graph was built
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    assert _max_abs(dx, dx_ref) <= GRAD_TOL
    assert _max_abs(dw, dw_ref) <= GRAD_TOL
    assert _max_abs(db, db_ref) <= GRAD_TOL

    # the first layer can skip dx; the parameter gradients must not change
    with torch.no_grad():
        dx_none, dw2, db2 = linear_backward(dy, x, w, need_input_grad=False)
    assert dx_none is None and torch.equal(dw2, dw) and torch.equal(db2, db)

    y_nobias = linear_forward(x.detach(), w.detach(), None)
    torch.testing.assert_close(y_nobias, F.linear(x, w).detach(), rtol=0, atol=1e-12)


def test_linear_finite_differences():
    g = _gen(2)
    x = torch.randn(4, 3, dtype=DT, generator=g, requires_grad=True)
    w = torch.randn(2, 3, dtype=DT, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=DT, generator=g, requires_grad=True)
    _gradcheck(_LinearFn.apply, (x, w, b))


# ----------------------------------------------------------------------------------------------------------
# ReLU
# ----------------------------------------------------------------------------------------------------------
def test_relu_matches_autograd_including_zero():
    g = _gen(3)
    x = torch.randn(6, 8, dtype=DT, generator=g)
    x[0, :4] = 0.0  # exactly at the kink: both must use the subgradient 0
    x.requires_grad_(True)
    dy = torch.randn(6, 8, dtype=DT, generator=g)

    y_ref = torch.relu(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    with torch.no_grad():
        y = relu_forward(x)
        dx = relu_backward(dy, y)
    assert torch.equal(y, y_ref)
    assert _max_abs(dx, dx_ref) <= GRAD_TOL
    assert torch.equal(dx[0, :4], torch.zeros(4, dtype=DT))


def test_relu_finite_differences():
    g = _gen(4)
    # keep |x| >= 0.1 so that no central difference (step 1e-6) straddles the kink at 0
    x = torch.randn(5, 4, dtype=DT, generator=g)
    x = (x.sign() * (x.abs() + 0.1)).requires_grad_(True)
    _gradcheck(_ReLUFn.apply, (x,))


# ----------------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------------
def test_dropout_matches_torch_dropout_with_same_seed():
    # On CPU our mask is the same bernoulli_ draw that F.dropout makes, so the same seed drops the same units.
    x = torch.randn(64, 32, dtype=DT, generator=_gen(5), requires_grad=True)
    dy = torch.randn(64, 32, dtype=DT, generator=_gen(6))
    p = 0.3

    torch.manual_seed(123)
    y_ref = F.dropout(x, p, training=True)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    torch.manual_seed(123)
    with torch.no_grad():
        y, mask = dropout_forward(x, p)
        dx = dropout_backward(dy, mask)
    assert torch.equal(y, y_ref)
    assert _max_abs(dx, dx_ref) <= GRAD_TOL


def test_dropout_backward_uses_forward_mask_and_scales_exactly():
    p = 0.25
    x = torch.randn(50, 40, dtype=DT, generator=_gen(7))
    y, mask = dropout_forward(x, p, generator=_gen(8))
    assert mask is not None
    kept = mask != 0
    assert 0 < kept.sum() < kept.numel()  # some dropped, some kept
    # mask values are exactly {0, 1/(1-p)}; kept units scaled by 1/(1-p) (rounding only), dropped are zero
    assert torch.equal(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))

    dy = torch.randn(50, 40, dtype=DT, generator=_gen(9))
    dx = dropout_backward(dy, mask)
    assert torch.equal(dx[~kept], torch.zeros_like(dx[~kept]))  # dropped units pass no gradient
    assert torch.equal(dx, dy * mask)
    # a different mask gives a different gradient: the check above would catch a backward that redraws
    _, other = dropout_forward(x, p, generator=_gen(10))
    assert not torch.equal(dropout_backward(dy, other), dx)


def test_dropout_preserves_expected_value():
    # mean of dropout(ones) over n = 1e6 units: std = sqrt(p / (1 - p) / n) ~ 6.5e-4 at p = 0.3;
    # a tolerance of 5e-3 is ~8 standard deviations (fixed seed, so the test is deterministic anyway).
    p = 0.3
    y, _ = dropout_forward(torch.ones(1_000_000, dtype=DT), p, generator=_gen(11))
    assert abs(y.mean().item() - 1.0) < 5e-3
    # and the keep fraction is 1 - p
    assert abs((y != 0).to(DT).mean().item() - (1 - p)) < 5e-3


def test_dropout_generator_and_global_rng():
    x = torch.randn(10, 10, dtype=DT, generator=_gen(12))
    state = torch.get_rng_state()
    y1, m1 = dropout_forward(x, 0.5, generator=_gen(13))
    assert torch.equal(torch.get_rng_state(), state)  # an explicit generator leaves the global RNG alone
    y2, m2 = dropout_forward(x, 0.5, generator=_gen(13))
    assert torch.equal(y1, y2) and torch.equal(m1, m2)
    torch.manual_seed(0)
    _, g1 = dropout_forward(x, 0.5)
    torch.manual_seed(0)
    _, g2 = dropout_forward(x, 0.5)
    assert torch.equal(g1, g2)


def test_dropout_identity_when_off():
    x = torch.randn(4, 5, dtype=DT)
    dy = torch.randn(4, 5, dtype=DT)
    for y, mask in (dropout_forward(x, 0.0), dropout_forward(x, 0.5, training=False)):
        assert y is x and mask is None
        assert dropout_backward(dy, mask) is dy
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="p"):
            dropout_forward(x, bad)


def test_dropout_finite_differences():
    x = torch.randn(6, 5, dtype=DT, generator=_gen(14), requires_grad=True)
    _gradcheck(lambda t: _DropoutFn.apply(t, 0.4, 15), (x,))


# ----------------------------------------------------------------------------------------------------------
# Softmax cross-entropy with label smoothing
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 1.0])
def test_softmax_ce_matches_torch(eps):
    g = _gen(16)
    logits = (3 * torch.randn(9, 6, dtype=DT, generator=g)).requires_grad_(True)
    target = torch.randint(0, 6, (9,), generator=g)

    loss_ref = F.cross_entropy(logits, target, label_smoothing=eps)
    (dlogits_ref,) = torch.autograd.grad(loss_ref, logits)
    with torch.no_grad():
        loss, probs = softmax_cross_entropy_forward(logits, target, eps)
        dlogits = softmax_cross_entropy_backward(probs, target, eps)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(probs, torch.softmax(logits.detach(), dim=1), rtol=0, atol=1e-14)
    assert _max_abs(dlogits, dlogits_ref) <= GRAD_TOL


def test_softmax_ce_smoothed_target_definition():
    # dlogits = (softmax - q) / B with q = (1 - eps) onehot + eps / K: check q itself by reconstructing it
    logits = torch.randn(4, 5, dtype=DT, generator=_gen(17))
    target = torch.tensor([0, 4, 2, 2])
    eps = 0.2
    _, probs = softmax_cross_entropy_forward(logits, target, eps)
    q = probs - 4 * softmax_cross_entropy_backward(probs, target, eps)
    q_expected = (1 - eps) * F.one_hot(target, 5).to(DT) + eps / 5
    torch.testing.assert_close(q, q_expected, rtol=0, atol=1e-15)


def test_softmax_ce_stable_for_huge_logits():
    g = _gen(18)
    logits = (1e4 * torch.randn(8, 5, dtype=DT, generator=g)).requires_grad_(True)
    logits.data[0] = torch.tensor([1e4, -1e4, 0.0, 1e4, -1e4], dtype=DT)  # ties and huge gaps
    target = torch.randint(0, 5, (8,), generator=g)
    for dtype in (DT, torch.float32):
        z = logits.detach().to(dtype)
        loss, probs = softmax_cross_entropy_forward(z, target, 0.1)
        dlogits = softmax_cross_entropy_backward(probs, target, 0.1)
        assert torch.isfinite(loss) and torch.isfinite(probs).all() and torch.isfinite(dlogits).all()
    loss_ref = F.cross_entropy(logits, target, label_smoothing=0.1)
    (dref,) = torch.autograd.grad(loss_ref, logits)
    loss, probs = softmax_cross_entropy_forward(logits.detach(), target, 0.1)
    # loss is of order 1e3-1e4 here, so compare relatively: a few ulps of it
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-13, atol=0)
    assert _max_abs(softmax_cross_entropy_backward(probs, target, 0.1), dref) <= GRAD_TOL


def test_softmax_ce_finite_differences():
    g = _gen(19)
    logits = torch.randn(5, 4, dtype=DT, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (5,), generator=g)
    for eps in (0.0, 0.15):
        _gradcheck(lambda z, eps=eps: _SoftmaxCEFn.apply(z, target, eps), (logits,))


# ----------------------------------------------------------------------------------------------------------
# ManualLinear: nn.Linear's names and initialisation
# ----------------------------------------------------------------------------------------------------------
def test_manual_linear_init_matches_nn_linear():
    torch.manual_seed(20)
    ref = nn.Linear(37, 11)
    torch.manual_seed(20)
    ours = ManualLinear(37, 11)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # the bound of nn.Linear's default init is 1/sqrt(fan_in)
    assert ours.weight.abs().max() <= 1 / math.sqrt(37) and ours.bias.abs().max() <= 1 / math.sqrt(37)
    x = torch.randn(3, 37)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# ManualSGD vs torch.optim.SGD
# ----------------------------------------------------------------------------------------------------------
SGD_SETTINGS = [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=5e-4),
    dict(momentum=0.9),
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.5, dampening=0.5, weight_decay=5e-4),
    dict(momentum=0.9, weight_decay=5e-4, maximize=True),
]


def _make_params(seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(*s, dtype=DT, generator=g, requires_grad=True) for s in [(4, 3), (3,), (2, 2, 2)]]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    # two param groups with their own lr / weight decay, to exercise per-group hyper-parameters
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.03, "weight_decay": 1e-3}]


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    """Identical random gradients for both optimizers (seeded by the step number)."""
    g = _gen(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, dtype=DT, generator=g)
        # param 1 has no gradient at step 2: both optimizers must skip it (and keep its momentum buffer)
        p.grad = None if (i == 1 and step == 2) else grad


def _lr_lambda(step: int) -> float:
    return (step + 1) / 3 if step < 2 else 0.5**step  # warm-up then decay: lr changes every step


@pytest.mark.parametrize("kwargs", SGD_SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_manual_sgd_equals_torch_sgd(kwargs):
    ours_p, ref_p = _make_params(21), _make_params(21)
    ours = ManualSGD(_groups(ours_p), lr=0.1, **kwargs)
    ref = torch.optim.SGD(_groups(ref_p), lr=0.1, foreach=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the scheduler's "step() called before optimizer.step()"
        ours_s = torch.optim.lr_scheduler.LambdaLR(ours, _lr_lambda)
        ref_s = torch.optim.lr_scheduler.LambdaLR(ref, _lr_lambda)
        for step in range(5):
            for opt, sched, params in ((ours, ours_s, ours_p), (ref, ref_s, ref_p)):
                _set_grads(params, step)
                opt.step()
                sched.step()
            # bit-identical: we call the same tensor operations in the same order (see ManualSGD.step)
            for a, b in zip(ours_p, ref_p, strict=True):
                assert torch.equal(a, b)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]

    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert sd_ours["state"].keys() == sd_ref["state"].keys()
    for k in sd_ref["state"]:
        assert sd_ours["state"][k].keys() == sd_ref["state"][k].keys()
        for name, value in sd_ref["state"][k].items():
            assert torch.equal(sd_ours["state"][k][name], value)
    if kwargs.get("momentum", 0) != 0:
        assert all(set(s) == {"momentum_buffer"} for s in sd_ours["state"].values())
        assert len(sd_ours["state"]) == len(ours_p)
    for g_ours, g_ref in zip(sd_ours["param_groups"], sd_ref["param_groups"], strict=True):
        assert g_ours["params"] == g_ref["params"]
        for key in ("lr", "initial_lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
            assert g_ours[key] == g_ref[key], key


@pytest.mark.parametrize("direction", ["torch_to_manual", "manual_to_torch"])
def test_manual_sgd_state_dict_interchangeable(direction):
    kwargs = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    a_p, b_p = _make_params(30), _make_params(30)
    classes = (torch.optim.SGD, ManualSGD)
    a_cls, b_cls = classes if direction == "torch_to_manual" else classes[::-1]
    a = a_cls(a_p, **kwargs)
    for p in a_p:
        p.grad = torch.randn(p.shape, dtype=DT, generator=_gen(31))
    a.step()
    a.step()
    with torch.no_grad():
        for p, q in zip(b_p, a_p, strict=True):
            p.copy_(q)
    b = b_cls(b_p, **kwargs)
    # deepcopy: load_state_dict keeps tensors that already have the right dtype/device, so without it
    # both optimizers would share (and both update in place) one momentum buffer
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for p, q in zip(a_p, b_p, strict=True):
        q.grad = p.grad.clone()
    a.step()
    b.step()
    for p, q in zip(a_p, b_p, strict=True):
        assert torch.equal(p, q)


def test_manual_sgd_validation_and_closure():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Nesterov"):
        ManualSGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Nesterov"):
        ManualSGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        ManualSGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        ManualSGD(p, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        ManualSGD(p, lr=0.1, weight_decay=-1.0)

    w = torch.tensor([3.0], requires_grad=True)
    opt = ManualSGD([w], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()  # d/dw = 2w = 6 -> w = 3 - 0.25 * 6 = 1.5
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 9.0 and w.item() == 1.5
