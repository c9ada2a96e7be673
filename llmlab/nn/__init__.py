"""From-scratch building blocks with torch.nn-like signatures, each proven equal to its torch twin."""

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

__all__ = [
    "ManualLinear",
    "ManualSGD",
    "dropout_backward",
    "dropout_forward",
    "linear_backward",
    "linear_forward",
    "relu_backward",
    "relu_forward",
    "softmax_cross_entropy_backward",
    "softmax_cross_entropy_forward",
]
