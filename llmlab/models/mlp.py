"""A multilayer perceptron classifier, twice: autograd (`MLP`) and hand-written backprop (`HandMLP`).

Architecture: flatten -> [Linear -> ReLU -> Dropout] x depth -> Linear -> logits.
Backpropagation as in Rumelhart, Hinton & Williams 1986; inverted dropout (Srivastava et al. 2014);
label smoothing (Szegedy et al. 2016). Both classes have the same parameter names (`layers.{i}.weight`,
`layers.{i}.bias`, nn.Linear's layout) and the same initialisation, so weights copy across with
`load_state_dict` and the same seed builds identical models; tests/models/test_mlp.py proves the hand-written
gradients equal autograd's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.nn.manual import (
    ManualLinear,
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    relu_backward,
    relu_forward,
    softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
)

__all__ = ["MLPConfig", "MLP", "HandMLP", "build_mlp"]

_IMPLS = ("autograd", "manual")


@dataclass
class MLPConfig:
    in_features: int = 784  # 28x28 MNIST pixels, flattened
    hidden: int = 1024  # width of each hidden layer
    depth: int = 2  # number of hidden layers (so depth + 1 Linear layers)
    num_classes: int = 10
    dropout: float = 0.2  # drop probability after each hidden ReLU
    impl: Literal["autograd", "manual"] = "autograd"  # which twin build_mlp returns

    def __post_init__(self) -> None:
        for name in ("in_features", "hidden", "depth", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPConfig.{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"MLPConfig.dropout must satisfy 0 <= dropout < 1, got {self.dropout!r}")
        if self.impl not in _IMPLS:
            raise ValueError(f"MLPConfig.impl must be one of {_IMPLS}, got {self.impl!r}")


def _flatten(x: Tensor, in_features: int) -> Tensor:
    """[B, H, W], [B, 1, H, W] or [B, in] -> [B, in_features]."""
    x = x.reshape(x.shape[0], -1)  # [B, in]
    if x.shape[1] != in_features:
        raise ValueError(f"expected {in_features} features per example after flattening, got {x.shape[1]}")
    return x


def _layer_sizes(cfg: MLPConfig) -> list[tuple[int, int]]:
    """(in, out) of each Linear layer: depth hidden layers, then the classifier."""
    widths = [cfg.in_features] + [cfg.hidden] * cfg.depth + [cfg.num_classes]
    return list(zip(widths[:-1], widths[1:], strict=True))


class MLP(nn.Module):
    """The autograd twin: torch.nn.Linear layers, gradients from loss.backward()."""

    computes_own_gradients = False

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([nn.Linear(i, o) for i, o in _layer_sizes(cfg)])

    def forward(self, x: Tensor) -> Tensor:
        h = _flatten(x, self.cfg.in_features)  # [B, in]
        for layer in self.layers[:-1]:
            h = F.dropout(F.relu(layer(h)), self.cfg.dropout, self.training)  # [B, hidden]
        return self.layers[-1](h)  # [B, K]


class HandMLP(nn.Module):
    """The from-scratch twin: forward and backward written with llmlab.nn.manual, no autograd.

    Training goes through `forward_backward`, which fills `.grad` itself (hence `computes_own_gradients`);
    any torch optimizer or LR scheduler then works unchanged. Plain `forward` is for evaluation (it is also
    differentiable by autograd, since it is made of ordinary tensor operations — the tests use that).
    Note: DistributedDataParallel averages gradients through autograd hooks, which `forward_backward` never
    triggers; a data-parallel trainer must all-reduce `.grad` explicitly for this model.
    """

    computes_own_gradients = True

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Same container, names, creation order and init as MLP -> identical state_dict for the same seed.
        self.layers = nn.ModuleList([ManualLinear(i, o) for i, o in _layer_sizes(cfg)])

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """x: [B, ...] -> logits [B, K]. Dropout is active only in training mode."""
        h = _flatten(x, self.cfg.in_features)  # [B, in]
        for layer in self.layers[:-1]:
            a = relu_forward(linear_forward(h, layer.weight, layer.bias))  # [B, hidden]
            h, _ = dropout_forward(a, self.cfg.dropout, self.training, generator)  # [B, hidden]
        last = self.layers[-1]
        return linear_forward(h, last.weight, last.bias)  # [B, K]

    @torch.no_grad()
    def forward_backward(
        self,
        x: Tensor,
        y: Tensor,
        label_smoothing: float = 0.0,
        loss_scale: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One forward pass and the hand-derived backward pass for softmax cross-entropy on (x, y).

        Adds `loss_scale * dL/dθ` to every parameter's `.grad` (created as zeros when None), so successive
        calls accumulate like successive loss.backward() calls; a trainer doing gradient accumulation over
        n micro-batches passes loss_scale = 1/n. L is the mean over this batch.
        Returns (loss: detached 0-dim tensor, unscaled; logits: [B, K]).
        """
        h = _flatten(x, self.cfg.in_features)  # [B, in]
        # Forward, remembering what each backward needs: the input of every Linear, the ReLU outputs
        # (their sign is the ReLU gradient) and the dropout masks (the gradient must see the same drops).
        inputs: list[Tensor] = []  # input of layer i: [B, in] then [B, hidden] ...
        relu_outs: list[Tensor] = []  # [B, hidden] per hidden layer
        masks: list[Tensor | None] = []  # [B, hidden] (or None when dropout is off) per hidden layer
        for layer in self.layers[:-1]:
            inputs.append(h)
            a = relu_forward(linear_forward(h, layer.weight, layer.bias))  # [B, hidden]
            h, mask = dropout_forward(a, self.cfg.dropout, self.training, generator)  # [B, hidden]
            relu_outs.append(a)
            masks.append(mask)
        inputs.append(h)
        last = self.layers[-1]
        logits = linear_forward(h, last.weight, last.bias)  # [B, K]
        loss, probs = softmax_cross_entropy_forward(logits, y, label_smoothing)  # scalar, [B, K]

        # Backward, last layer first. Scaling the very first gradient scales every gradient below it
        # (the chain rule is linear in the upstream gradient), so loss_scale costs one multiply.
        dh = softmax_cross_entropy_backward(probs, y, label_smoothing) * loss_scale  # [B, K]
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            # layer 0's input is the data: no gradient needed for it
            dh_in, dweight, dbias = linear_backward(dh, inputs[i], layer.weight, need_input_grad=i > 0)
            _accumulate(layer.weight, dweight)  # [out, in]
            _accumulate(layer.bias, dbias)  # [out]
            if i > 0:
                # dh_in is dL/d(output of hidden layer i-1), i.e. after its dropout: undo dropout, then ReLU
                dh = relu_backward(dropout_backward(dh_in, masks[i - 1]), relu_outs[i - 1])  # [B, hidden]
        return loss.detach(), logits


def _accumulate(param: nn.Parameter, grad: Tensor) -> None:
    """param.grad += grad, creating .grad as zeros first, like autograd's accumulation into leaves."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    param.grad.add_(grad)


def build_mlp(cfg: MLPConfig) -> nn.Module:
    """MLP for impl="autograd", HandMLP for impl="manual"."""
    if cfg.impl == "autograd":
        return MLP(cfg)
    if cfg.impl == "manual":
        return HandMLP(cfg)
    raise ValueError(f"MLPConfig.impl must be one of {_IMPLS}, got {cfg.impl!r}")
