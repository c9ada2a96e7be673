"""Tests for llmlab.models.mlp: HandMLP (hand-written backprop) against MLP (autograd), config validation.

Tolerances: float64 throughout. Hand-written and autograd gradients differ only by summation order
(a few ulps, ~1e-16 for these magnitudes), so 1e-10 (max abs) has a wide margin yet catches any real error.
Finite differences (central, h=1e-6): truncation O(h^2) ~ 1e-12 plus rounding ~1e-16/h ~ 1e-10, so 1e-7.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmlab.models import MLP, HandMLP, MLPConfig, build_mlp
from llmlab.nn import ManualSGD

DT = torch.float64
GRAD_TOL = 1e-10  # see module docstring
FD_TOL = 1e-7  # see module docstring


def _small_cfg(**overrides) -> MLPConfig:
    kw = dict(in_features=12, hidden=16, depth=3, num_classes=5, dropout=0.0)
    kw.update(overrides)
    return MLPConfig(**kw)


def _twins(cfg: MLPConfig, seed: int = 0) -> tuple[MLP, HandMLP]:
    """An autograd MLP and a HandMLP with the same float64 weights (copied across with load_state_dict)."""
    torch.manual_seed(seed)
    ref = MLP(cfg).to(DT)
    hand = HandMLP(cfg).to(DT)
    with torch.no_grad():  # scramble first so that the copy below is what makes them equal
        for p in hand.parameters():
            p.normal_()
    hand.load_state_dict(ref.state_dict())
    return ref, hand


def _batch(cfg: MLPConfig, n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_features, dtype=DT, generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return x, y


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _autograd_grads(model: MLP, x, y, label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y, label_smoothing=label_smoothing).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("in_features", 0),
        ("hidden", -3),
        ("depth", 0),
        ("num_classes", 0),
        ("hidden", 2.5),
        ("depth", True),
        ("dropout", -0.1),
        ("dropout", 1.0),
        ("dropout", "0.2"),
        ("impl", "numpy"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        MLPConfig(**{field: value})


def test_config_defaults_and_build():
    cfg = MLPConfig()
    assert cfg == MLPConfig(
        in_features=784, hidden=1024, depth=2, num_classes=10, dropout=0.2, impl="autograd"
    )
    assert type(build_mlp(_small_cfg())) is MLP
    hand = build_mlp(_small_cfg(impl="manual"))
    assert type(hand) is HandMLP and hand.computes_own_gradients is True
    assert len(hand.layers) == 4  # depth + 1


@pytest.mark.parametrize("cfg", [MLPConfig(), _small_cfg(dropout=0.3, depth=1)])
def test_same_seed_gives_identical_state_dicts(cfg):
    torch.manual_seed(1234)
    ref = MLP(cfg)
    torch.manual_seed(1234)
    hand = HandMLP(cfg)
    sd_ref, sd_hand = ref.state_dict(), hand.state_dict()
    expected = [f"layers.{i}.{k}" for i in range(cfg.depth + 1) for k in ("weight", "bias")]
    assert list(sd_ref) == expected and list(sd_hand) == expected
    for k in expected:
        assert sd_hand[k].shape == sd_ref[k].shape
        assert torch.equal(sd_hand[k], sd_ref[k]), k


def test_input_shapes():
    cfg = _small_cfg(in_features=16)
    ref, hand = _twins(cfg)
    x = torch.randn(3, 4, 4, dtype=DT)
    for model in (ref, hand):
        model.eval()
        out = model(x)
        assert out.shape == (3, cfg.num_classes)
        assert torch.equal(model(x.unsqueeze(1)), out)  # [B, 1, H, W]
        assert torch.equal(model(x.reshape(3, 16)), out)  # [B, in]
        with pytest.raises(ValueError, match="16"):
            model(torch.randn(3, 5, 5, dtype=DT))


# ----------------------------------------------------------------------------------------------------------
# HandMLP against the autograd twin
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_hand_mlp_matches_autograd_without_dropout(label_smoothing):
    cfg = _small_cfg()
    ref, hand = _twins(cfg)
    x, y = _batch(cfg)

    logits_ref, grads_ref = _autograd_grads(ref, x, y, label_smoothing)
    hand.zero_grad(set_to_none=True)
    loss, logits = hand.forward_backward(x, y, label_smoothing=label_smoothing)

    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(hand(x), logits_ref, rtol=0, atol=1e-12)  # plain forward too
    torch.testing.assert_close(
        loss, F.cross_entropy(logits_ref, y, label_smoothing=label_smoothing), rtol=0, atol=1e-12
    )
    for name, p in hand.named_parameters():
        assert _max_abs(p.grad, grads_ref[name]) <= GRAD_TOL, name


def test_hand_mlp_matches_autograd_with_dropout_same_seed():
    # On CPU HandMLP draws its dropout masks exactly as F.dropout does (bernoulli_(1-p) shaped like the
    # activation, layer by layer), so re-seeding the global RNG makes both models drop the same units.
    cfg = _small_cfg(dropout=0.4)
    ref, hand = _twins(cfg)
    ref.train()
    hand.train()
    x, y = _batch(cfg, n=16)

    torch.manual_seed(77)
    logits_ref, grads_ref = _autograd_grads(ref, x, y, 0.1)
    torch.manual_seed(77)
    hand.zero_grad(set_to_none=True)
    _, logits = hand.forward_backward(x, y, label_smoothing=0.1)

    # dropout really was active: without it the logits differ (so the test can fail on a wrong mask)
    ref.eval()
    assert _max_abs(ref(x).detach(), logits_ref) > 1e-3
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-12)
    for name, p in hand.named_parameters():
        assert _max_abs(p.grad, grads_ref[name]) <= GRAD_TOL, name

    # and a different seed gives a different gradient: the masks are not ignored
    torch.manual_seed(78)
    hand.zero_grad(set_to_none=True)
    hand.forward_backward(x, y, label_smoothing=0.1)
    assert _max_abs(hand.layers[0].weight.grad, grads_ref["layers.0.weight"]) > 1e-6


def test_hand_mlp_dropout_against_autograd_through_its_own_forward():
    # A second reference that does not rely on matching F.dropout's RNG: autograd through HandMLP.forward
    # (ordinary tensor ops) with the same explicit generator seed, hence the same masks.
    cfg = _small_cfg(dropout=0.25)
    _, hand = _twins(cfg)
    hand.train()
    x, y = _batch(cfg, n=10)

    hand.zero_grad(set_to_none=True)
    logits_ref = hand(x, generator=torch.Generator().manual_seed(5))
    F.cross_entropy(logits_ref, y, label_smoothing=0.2).backward()
    grads_ref = {n: p.grad.clone() for n, p in hand.named_parameters()}

    hand.zero_grad(set_to_none=True)
    _, logits = hand.forward_backward(x, y, label_smoothing=0.2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits, logits_ref.detach(), rtol=0, atol=1e-12)
    for name, p in hand.named_parameters():
        assert _max_abs(p.grad, grads_ref[name]) <= GRAD_TOL, name


def test_gradient_accumulation_two_halves_equal_whole():
    cfg = _small_cfg()
    _, hand = _twins(cfg)
    x, y = _batch(cfg, n=12)

    hand.zero_grad(set_to_none=True)
    hand.forward_backward(x, y, label_smoothing=0.1)
    whole = {n: p.grad.clone() for n, p in hand.named_parameters()}

    hand.zero_grad(set_to_none=True)
    loss_a, _ = hand.forward_backward(x[:6], y[:6], label_smoothing=0.1, loss_scale=0.5)
    loss_b, _ = hand.forward_backward(x[6:], y[6:], label_smoothing=0.1, loss_scale=0.5)
    # the sums are split differently, so allow rounding (still far below any real discrepancy)
    for name, p in hand.named_parameters():
        assert _max_abs(p.grad, whole[name]) <= 1e-12, name
    # returned losses are the unscaled means of each half
    full_loss = F.cross_entropy(hand(x), y, label_smoothing=0.1)
    torch.testing.assert_close((loss_a + loss_b) / 2, full_loss.detach(), rtol=0, atol=1e-12)

    # accumulation adds onto whatever .grad holds, like loss.backward()
    hand.zero_grad(set_to_none=False)
    for p in hand.parameters():
        p.grad.fill_(1.0)
    hand.forward_backward(x, y, label_smoothing=0.1)
    for name, p in hand.named_parameters():
        assert _max_abs(p.grad, whole[name] + 1.0) <= 1e-12, name


def test_forward_backward_builds_no_graph():
    cfg = _small_cfg(dropout=0.2)
    _, hand = _twins(cfg)
    hand.train()
    x, y = _batch(cfg)
    assert all(p.requires_grad for p in hand.parameters())

    hand.zero_grad(set_to_none=True)
    loss, logits = hand.forward_backward(x, y, generator=torch.Generator().manual_seed(0))
    assert loss.grad_fn is None and not loss.requires_grad and loss.dim() == 0
    assert logits.grad_fn is None and not logits.requires_grad
    for p in hand.parameters():
        assert p.grad_fn is None and p.grad is not None and p.grad.grad_fn is None
    first = {n: p.grad.clone() for n, p in hand.named_parameters()}

    hand.zero_grad(set_to_none=True)
    with torch.no_grad():  # and it works when the caller already disabled autograd
        loss2, _ = hand.forward_backward(x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss2, loss)
    for n, p in hand.named_parameters():
        assert torch.equal(p.grad, first[n])


def test_hand_mlp_finite_differences():
    # Every parameter of a tiny model, dropout on (fixed by re-seeding the generator at each evaluation)
    # and label smoothing on.
    cfg = MLPConfig(in_features=5, hidden=4, depth=2, num_classes=3, dropout=0.3, impl="manual")
    torch.manual_seed(3)
    hand = HandMLP(cfg).to(DT).train()
    x, y = _batch(cfg, n=6, seed=4)
    eps, h = 0.1, 1e-6

    def loss_at() -> float:
        logits = hand(x, generator=torch.Generator().manual_seed(9))
        return F.cross_entropy(logits, y, label_smoothing=eps).item()

    hand.zero_grad(set_to_none=True)
    hand.forward_backward(x, y, label_smoothing=eps, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for name, p in hand.named_parameters():
            flat = p.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + h
                up = loss_at()
                flat[j] = old - h
                down = loss_at()
                flat[j] = old
                fd = (up - down) / (2 * h)
                assert abs(p.grad.view(-1)[j].item() - fd) <= FD_TOL, (name, j)


def test_training_step_matches_autograd_with_sgd():
    # End to end: a few optimiser steps of HandMLP + ManualSGD track MLP + torch.optim.SGD.
    cfg = _small_cfg(dropout=0.0)
    ref, hand = _twins(cfg, seed=8)
    x, y = _batch(cfg, n=20, seed=9)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), **kw)
    opt_hand = ManualSGD(hand.parameters(), **kw)
    losses = []
    for _ in range(10):
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y, label_smoothing=0.1).backward()
        opt_ref.step()
        opt_hand.zero_grad()
        loss, _ = hand.forward_backward(x, y, label_smoothing=0.1)
        opt_hand.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it learns
    for (name, p), q in zip(hand.named_parameters(), ref.parameters(), strict=True):
        assert _max_abs(p.detach(), q.detach()) <= GRAD_TOL, name
    # optimizer state round-trips into the reference optimizer
    opt_ref2 = torch.optim.SGD(ref.parameters(), **kw)
    opt_ref2.load_state_dict(copy.deepcopy(opt_hand.state_dict()))
    assert opt_ref2.state_dict()["state"].keys() == opt_hand.state_dict()["state"].keys()
