"""Model architectures, one file each, with a small dataclass config per model."""

from llmlab.models.mlp import MLP, HandMLP, MLPConfig, build_mlp

__all__ = ["MLP", "HandMLP", "MLPConfig", "build_mlp"]
from llmlab.models.resnet import (
    BasicBlock,
    Bottleneck,
    PaddedIdentityShortcut,
    ResNet,
    ResNetConfig,
    build_resnet,
    convert_torchvision_state_dict,
    count_parameters,
    load_torchvision_weights,
)

__all__ += [
    "BasicBlock",
    "Bottleneck",
    "PaddedIdentityShortcut",
    "ResNet",
    "ResNetConfig",
    "build_resnet",
    "convert_torchvision_state_dict",
    "count_parameters",
    "load_torchvision_weights",
]
