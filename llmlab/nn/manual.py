"""Hand-derived forward/backward pairs for an MLP, and SGD written out by hand.

Everything here runs without autograd: each `*_backward` is the chain rule worked out on paper for one
operation, turning dL/d(output) into dL/d(inputs) and dL/d(parameters) (backpropagation, Rumelhart,
Hinton & Williams 1986). The pieces:

- linear layer in `torch.nn.Linear`'s layout (y = x W^T + b);
- ReLU;
- inverted dropout (Srivastava et al. 2014, JMLR 15), scaled at training time so evaluation is identity;
- softmax cross-entropy with label smoothing (Szegedy et al. 2016, "Rethinking the Inception
  Architecture", section 7), made numerically stable with the log-sum-exp shift;
- `ManualSGD`, SGD with momentum/dampening/Nesterov/weight decay following the update rule in
  PyTorch's `torch.optim.SGD` documentation (Nesterov as in Sutskever et al. 2013, PyTorch's form).

Conventions: B = batch size, K = number of classes. Gradients are of a scalar loss L.
The tests in tests/nn/test_manual.py prove each backward equal to autograd (float64, <=1e-10) and to
finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "linear_forward",
    "linear_backward",
    "relu_forward",
    "relu_backward",
    "dropout_forward",
    "dropout_backward",
    "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward",
    "ManualLinear",
    "ManualSGD",
]


# ----------------------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------------------
def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x W^T + b, with W stored as [out, in] exactly like `torch.nn.Linear`.

    x: [B, in], weight: [out, in], bias: [out] or None -> y: [B, out]
    """
    y = x @ weight.t()  # [B, out]
    if bias is not None:
        y = y + bias  # [B, out]; bias broadcasts over the batch
    return y


def linear_backward(
    dy: Tensor, x: Tensor, weight: Tensor, need_input_grad: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of y = x W^T + b given dy = dL/dy.

    Element-wise y[b, o] = sum_i x[b, i] W[o, i] + b[o], so
      dL/dx[b, i] = sum_o dy[b, o] W[o, i]        ->  dx = dy W        [B, in]
      dL/dW[o, i] = sum_b dy[b, o] x[b, i]        ->  dW = dy^T x      [out, in]
      dL/db[o]    = sum_b dy[b, o]                ->  db = dy summed over the batch  [out]
    The batch sums appear because the same W and b are used by every example.

    dy: [B, out], x: [B, in] (the forward input), weight: [out, in]
    Returns (dx [B, in] or None when `need_input_grad` is False, dweight [out, in], dbias [out]).
    The first layer of a network never needs dx (its input is data), so skipping it saves one matmul.
    """
    dx = dy @ weight if need_input_grad else None  # [B, out] @ [out, in] -> [B, in]
    dweight = dy.t() @ x  # [out, B] @ [B, in] -> [out, in]
    dbias = dy.sum(dim=0)  # [out]
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------------------
# ReLU
# ----------------------------------------------------------------------------------------------------------
def relu_forward(x: Tensor) -> Tensor:
    """y = max(x, 0), any shape."""
    return x.clamp_min(0)


def relu_backward(dy: Tensor, y: Tensor) -> Tensor:
    """dL/dx = dL/dy * 1[x > 0].

    ReLU is the identity where x > 0 and constant (zero) where x < 0, so the gradient passes through
    unchanged or is blocked. At x = 0 the function has a kink; like PyTorch we use the subgradient 0.
    We take the forward *output* y rather than x because y > 0 exactly when x > 0, so a network only has
    to keep one activation tensor per layer (PyTorch's autograd does the same).

    dy, y: same shape -> dx: same shape
    """
    return dy * (y > 0).to(dy.dtype)


# ----------------------------------------------------------------------------------------------------------
# Inverted dropout
# ----------------------------------------------------------------------------------------------------------
def dropout_forward(
    x: Tensor, p: float, training: bool = True, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """Inverted dropout: zero each element with probability p and scale survivors by 1/(1-p).

    Scaling at training time keeps E[y] = (1-p) * x / (1-p) = x, so evaluation needs no rescaling and is
    the identity (the "inverted" variant of Srivastava et al. 2014, which scale weights at test time).

    The random keep-mask is drawn with `bernoulli_(1 - p)` on a tensor shaped like x, from `generator` when
    given, else from the global torch RNG. On CPU this is the same draw `torch.nn.functional.dropout`
    makes, so with the same seed both drop the same units (on CUDA, F.dropout uses a fused kernel whose
    draws differ).

    x: any shape -> (y: same shape, mask: same shape holding 0 or 1/(1-p), or None when dropout is off).
    The returned mask already contains the 1/(1-p) scale, so y = x * mask and the backward is one multiply.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must satisfy 0 <= p < 1, got {p}")
    if not training or p == 0.0:
        return x, None  # identity: no mask to remember
    mask = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)  # 1 = keep, 0 = drop
    mask.div_(1.0 - p)  # keep -> 1/(1-p), drop -> 0
    return x * mask, mask


def dropout_backward(dy: Tensor, mask: Tensor | None) -> Tensor:
    """y = x * mask with a constant mask, so dL/dx = dL/dy * mask (the *same* mask as the forward).

    mask=None means the forward was the identity, so the gradient passes through.
    """
    if mask is None:
        return dy
    return dy * mask


# ----------------------------------------------------------------------------------------------------------
# Softmax cross-entropy with label smoothing
# ----------------------------------------------------------------------------------------------------------
def _smoothed_targets(target: Tensor, num_classes: int, label_smoothing: float, dtype: torch.dtype) -> Tensor:
    """q = (1 - eps) * onehot(target) + eps / K, the distribution F.cross_entropy(label_smoothing=eps) uses.

    target: [B] class indices -> q: [B, K], each row sums to 1.
    """
    q = torch.full(
        (target.shape[0], num_classes), label_smoothing / num_classes, dtype=dtype, device=target.device
    )  # [B, K]
    # add (1 - eps) on the true class; scatter_add keeps the eps/K that the true class also receives
    q.scatter_add_(1, target.unsqueeze(1), torch.full_like(q[:, :1], 1.0 - label_smoothing))  # [B, K]
    return q


def softmax_cross_entropy_forward(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Mean over the batch of the cross-entropy between q (smoothed targets) and softmax(logits).

    L = -(1/B) sum_b sum_k q[b, k] log softmax(z)[b, k],  log softmax(z)_k = z_k - logsumexp(z).
    Stability: logsumexp(z) = m + log sum_k exp(z_k - m) with m = max_k z_k, so every exp argument is
    <= 0 and nothing overflows even for logits of 1e4; log-probabilities are formed as differences, never
    as log(exp(...)), so nothing underflows to log(0) either.

    logits: [B, K], target: [B] (int64 class indices)
    Returns (loss: 0-dim tensor, probs: [B, K] softmax, kept for the backward).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    batch, num_classes = logits.shape
    m = logits.amax(dim=1, keepdim=True)  # [B, 1]
    shifted = logits - m  # [B, K], all <= 0
    log_z = shifted.exp().sum(dim=1, keepdim=True).log()  # [B, 1], log of a number in [1, K]
    log_probs = shifted - log_z  # [B, K]
    q = _smoothed_targets(target, num_classes, label_smoothing, logits.dtype)  # [B, K]
    loss = -(q * log_probs).sum() / batch  # scalar
    return loss, log_probs.exp()


def softmax_cross_entropy_backward(probs: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """dL/dlogits = (softmax(z) - q) / B.

    Per example, l = -sum_k q_k (z_k - logsumexp(z)). Since d logsumexp(z)/dz_j = softmax(z)_j and
    sum_k q_k = 1:  dl/dz_j = -q_j + softmax(z)_j. The batch mean contributes the 1/B.

    probs: [B, K] (from the forward), target: [B] -> dlogits: [B, K]
    """
    batch, num_classes = probs.shape
    q = _smoothed_targets(target, num_classes, label_smoothing, probs.dtype)  # [B, K]
    return (probs - q) / batch  # [B, K]


# ----------------------------------------------------------------------------------------------------------
# A parameter holder with nn.Linear's names and initialisation
# ----------------------------------------------------------------------------------------------------------
class ManualLinear(nn.Module):
    """Holds `weight` [out, in] and `bias` [out] as nn.Parameters, initialised like `torch.nn.Linear`.

    Its forward is `linear_forward`; the gradient comes from `linear_backward`, called by the model that owns
    it. Being an nn.Module with the same parameter names as nn.Linear means state_dicts, optimizers and
    gradient all-reduce treat it exactly like the autograd twin.
    """

    def __init__(self, in_features: int, out_features: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # empty() draws nothing from the RNG, so creation order alone decides which random numbers each
        # layer gets -- the same as nn.Linear, which is what makes same-seed inits identical.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default: W and b ~ U(-1/sqrt(in), 1/sqrt(in)).

        PyTorch phrases the weight part as kaiming_uniform_(a=sqrt(5)); its bound
        sqrt(3) * sqrt(2 / (1 + a^2)) / sqrt(in) simplifies to 1/sqrt(in). We call the same init function
        rather than our own uniform_(-1/sqrt(in), ...) because the two bounds can differ in the last bit,
        and the lab's claim is *bit-identical* weights for the same seed.
        """
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return linear_forward(x, self.weight, self.bias)  # [B, in] -> [B, out]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ----------------------------------------------------------------------------------------------------------
# SGD, written out by hand
# ----------------------------------------------------------------------------------------------------------
class ManualSGD(torch.optim.Optimizer):
    r"""SGD with momentum, dampening, Nesterov momentum and (coupled, L2) weight decay.

    The update, per parameter θ with gradient g at step t (PyTorch's formulation, torch.optim.SGD docs):

        g  <- -g                                  if maximize
        g  <- g + λ θ                             weight decay λ: gradient of (λ/2)||θ||² added to the loss
        if μ != 0:
            b <- g                                at the first step (no dampening applied yet)
            b <- μ b + (1 - τ) g                  afterwards (τ = dampening)
            g <- g + μ b                          if nesterov
            g <- b                                otherwise
        θ  <- θ - lr g

    Nesterov momentum (Sutskever et al. 2013, "On the importance of initialization and momentum in deep
    learning") evaluates the gradient at the look-ahead point θ - lr μ b; PyTorch rewrites it in terms of
    the current parameters, which gives the "g + μ b" step above. Note this is *not* the original
    Polyak/Sutskever form v <- μ v - lr g (lr multiplies the buffer at step time instead), which matters
    when the learning rate changes during training.

    Subclassing torch.optim.Optimizer gives param_groups, per-parameter `state` (holding
    "momentum_buffer", like torch.optim.SGD), state_dict()/load_state_dict() and LR-scheduler support;
    the arithmetic is all in `step()`. State dicts are interchangeable with torch.optim.SGD's.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts from older torch versions may lack these keys
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr = group["lr"]
            momentum = group["momentum"]
            dampening = group["dampening"]
            weight_decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:  # parameter not used this step: leave it (and its buffer) alone
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ManualSGD does not support sparse gradients")
                # Why `a.add(b, alpha=c)` rather than `a + c * b`: it is the same arithmetic, but PyTorch's
                # SGD uses these exact calls, and one fused kernel can round differently from a multiply
                # followed by an add. The same calls make our parameters bit-identical to torch.optim.SGD's.
                g = -p.grad if group["maximize"] else p.grad  # [same shape as p]
                if weight_decay != 0:
                    g = g.add(p, alpha=weight_decay)  # g + λθ (a new tensor: p.grad itself is not modified)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        # first step: the buffer *is* the gradient (no (1 - τ) factor), as in torch.optim.SGD
                        buf = g.detach().clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(g, alpha=1 - dampening)  # b = μb + (1-τ)g, in place
                    g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(g, alpha=-lr)  # θ = θ - lr g
        return loss
