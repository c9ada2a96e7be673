"""Residual networks from scratch (He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition").

Two families share one block and network code:
- ImageNet family (Table 1): resnet18/34 (BasicBlock: two 3x3 convs) and resnet50 (Bottleneck: 1x1, 3x3, 1x1,
  expansion 4), four stages of 64/128/256/512 channels. The Bottleneck strides on its 3x3 conv rather than its
  first 1x1 conv, as torchvision does ("ResNet v1.5"), so a strided block sees every input pixel.
- CIFAR family (§4.2): resnet20/32/44/56 = 6n+2 layers, a 3x3 16-channel stem, three stages of n BasicBlocks
  with 16/32/64 channels, global average pooling, fc. Shortcut option A (§3.3: parameter-free identity,
  stride-2 subsampling, zero-padded extra channels; the paper's Table 6 networks) or option B (1x1 conv + BN
  projection only where the shape changes).

Either family takes a CIFAR stem (3x3 stride-1 conv, no max-pool; `maxpool` stays as nn.Identity so module
names are unchanged); the ImageNet family also takes the ImageNet stem (7x7 stride-2 conv, 3x3 s2 max-pool).

Names and initialisation follow torchvision.models.resnet{18,34,50}: parameter and buffer names are identical
(`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ..., `fc`), modules are created and registered in
the same order, and weights are initialised the same way (Kaiming-normal fan_out for convs, He et al. 2015;
BN gamma 1 / beta 0; nn.Linear's default for fc; optional zero gamma on the last BN of each block, Goyal et
al. 2017 §5.1), so the same seed builds the same weights. Checkpoints from torchvision, and timm ResNets on
the Hugging Face Hub (which use torchvision's names), load through one converter, `load_torchvision_weights`.
tests/models/test_resnet.py proves logits, gradients and BN running statistics equal to torchvision's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ResNetConfig",
    "BasicBlock",
    "Bottleneck",
    "PaddedIdentityShortcut",
    "ResNet",
    "build_resnet",
    "convert_torchvision_state_dict",
    "load_torchvision_weights",
    "count_parameters",
]

_IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50")
_CIFAR_ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56")
_STEMS = ("cifar", "imagenet")
_SHORTCUTS = ("A", "B")

# arch -> (block kind, blocks per stage). ImageNet: Table 1 of the paper; CIFAR: n = (depth - 2) / 6 (§4.2).
_LAYOUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet20": ("basic", (3, 3, 3)),
    "resnet32": ("basic", (5, 5, 5)),
    "resnet44": ("basic", (7, 7, 7)),
    "resnet56": ("basic", (9, 9, 9)),
}


@dataclass
class ResNetConfig:
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet20", "resnet32", "resnet44", "resnet56"] = (
        "resnet18"
    )
    stem: Literal["cifar", "imagenet"] = (
        "cifar"  # cifar: 3x3 s1 conv, no max-pool; imagenet: 7x7 s2 + max-pool
    )
    num_classes: int = 10
    zero_init_residual: bool = False  # last BN gamma of every block = 0, so each block starts as the identity
    shortcut: Literal["A", "B"] = "B"  # A (zero-padding identity) exists for the CIFAR family only

    def __post_init__(self) -> None:
        if self.arch not in _LAYOUTS:
            raise ValueError(f"ResNetConfig.arch must be one of {tuple(_LAYOUTS)}, got {self.arch!r}")
        if self.stem not in _STEMS:
            raise ValueError(f"ResNetConfig.stem must be one of {_STEMS}, got {self.stem!r}")
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 1
        ):
            raise ValueError(f"ResNetConfig.num_classes must be a positive integer, got {self.num_classes!r}")
        if not isinstance(self.zero_init_residual, bool):
            raise ValueError(
                f"ResNetConfig.zero_init_residual must be a bool, got {self.zero_init_residual!r}"
            )
        if self.shortcut not in _SHORTCUTS:
            raise ValueError(f"ResNetConfig.shortcut must be one of {_SHORTCUTS}, got {self.shortcut!r}")
        if self.arch in _CIFAR_ARCHS and self.stem != "cifar":
            # 32x32 images through a 4x-downsampling stem would leave 2x2 maps at the last stage
            raise ValueError(f"ResNetConfig.stem must be 'cifar' for the CIFAR-family arch {self.arch!r}")
        if self.shortcut == "A" and self.arch not in _CIFAR_ARCHS:
            raise ValueError(
                f"ResNetConfig.shortcut 'A' is only defined for the CIFAR family {_CIFAR_ARCHS}; "
                f"{self.arch!r} uses projection shortcuts 'B' (torchvision-compatible)"
            )

    @property
    def family(self) -> Literal["imagenet", "cifar"]:
        return "cifar" if self.arch in _CIFAR_ARCHS else "imagenet"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # no bias: the BN that follows every conv has its own shift, a conv bias would be cancelled by it
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class PaddedIdentityShortcut(nn.Module):
    """Shortcut option A (§3.3): identity on the first `in_channels` channels, zeros on the extra ones.

    x [B, C_in, H, W] -> [B, C_out, ceil(H/s), ceil(W/s)]: keep every s-th pixel (the strided 3x3 conv of the
    residual branch produces the same grid), then append C_out - C_in all-zero channels. No parameters, so the
    gradient reaches only the kept pixels of the input, and nothing flows from the padded channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A can only add channels, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # [B, C_in, H/s, W/s]
        # F.pad's pairs run from the last dim backwards: (W_left, W_right, H_top, H_bottom, C_front, C_back)
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))  # [B, C_out, H/s, W/s]

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _shortcut(in_channels: int, out_channels: int, stride: int, kind: str) -> nn.Module | None:
    """What adds the block input onto its residual: None (plain identity) unless the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    if kind == "A":
        return PaddedIdentityShortcut(in_channels, out_channels, stride)
    # option B: a learned projection; `downsample.0` / `downsample.1` are torchvision's names
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU (Fig. 2, Fig. 5 left). Output channels = `channels`."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        out_channels = channels * self.expansion
        # Registration order (conv1, bn1, conv2, bn2, downsample) fixes the state_dict order and the order in
        # which ResNet._init_weights draws random numbers; it is torchvision's.
        self.conv1 = _conv3x3(in_channels, channels, stride)  # the stride sits on the first conv
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, shortcut)

    @property
    def residual_bn(self) -> nn.BatchNorm2d:
        """The BN that closes the residual branch (zeroed by zero_init_residual)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # [B, C_out, H/s, W/s]
        out = self.relu(self.bn1(self.conv1(x)))  # [B, C, H/s, W/s]
        out = self.bn2(self.conv2(out))  # [B, C_out, H/s, W/s]
        # in place: `out` is a fresh BN output that autograd does not need to keep
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand to 4x `channels`, + shortcut, ReLU (Fig. 5 right)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = _conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        # Striding a 1x1 conv (the paper's v1) would discard 3/4 of the input pixels before any 3x3 sees them.
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = _conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, shortcut)

    @property
    def residual_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # [B, 4C, H/s, W/s]
        out = self.relu(self.bn1(self.conv1(x)))  # [B, C, H, W]
        out = self.relu(self.bn2(self.conv2(out)))  # [B, C, H/s, W/s]
        out = self.bn3(self.conv3(out))  # [B, 4C, H/s, W/s]
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """stem -> (max-pool) -> layer1..layerN -> global average pool -> fc. x [B, 3, H, W] -> logits [B, K]."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        cfg.__post_init__()  # fields may have been changed since construction
        self.cfg = cfg
        kind, depths = _LAYOUTS[cfg.arch]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        widths = (64, 128, 256, 512) if cfg.family == "imagenet" else (16, 32, 64)
        stem_channels = widths[0]

        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(3, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        # Identity for the CIFAR stem: 32x32 inputs cannot afford another 2x downsampling, and keeping the
        # attribute keeps every module name the same for both stems.
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if cfg.stem == "imagenet" else nn.Identity()
        )
        in_channels = stem_channels
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(depths)))
        for i, (name, width, n) in enumerate(zip(self.stage_names, widths, depths, strict=True)):
            stride = 1 if i == 0 else 2  # every later stage halves the map and doubles the channels
            blocks = []
            for j in range(n):
                blocks.append(block(in_channels, width, stride if j == 0 else 1, cfg.shortcut))
                in_channels = width * block.expansion
            self.add_module(name, nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, cfg.num_classes)  # keeps nn.Linear's default init, as torchvision
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Kaiming-normal with fan_out: the variance that keeps backward signals at unit scale through ReLUs
        # (He et al. 2015). Same module order as torchvision, so the same seed draws the same weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.residual_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # [B, C0, H/2, W/2] imagenet stem; [B, C0, H, W] cifar stem
        x = self.maxpool(x)  # [B, C0, H/4, W/4] imagenet stem; unchanged for the cifar stem
        for name in self.stage_names:
            x = getattr(self, name)(x)  # each later stage: channels x2, spatial /2
        x = torch.flatten(self.avgpool(x), 1)  # [B, C_last]
        return self.fc(x)  # [B, K]


def build_resnet(cfg: ResNetConfig) -> ResNet:
    """The network described by `cfg`, freshly initialised from the global RNG."""
    return ResNet(cfg)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers such as BN running statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint conversion: the single place where torchvision's names meet ours
# ----------------------------------------------------------------------------------------------------------
_BLOCK_KEY = re.compile(r"layer(\d+)\.(\d+)\.")
_NUM_BATCHES = "num_batches_tracked"


def _infer_config(keys: list[str]) -> ResNetConfig:
    """The arch (and, for the CIFAR family, the shortcut option) a checkpoint holds, from its key layout."""
    depths: dict[int, int] = {}
    bottleneck = projections = False
    for k in keys:
        m = _BLOCK_KEY.match(k)
        if m:
            stage, index = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), index + 1)
            bottleneck |= k[m.end() :].startswith("conv3.")
            projections |= k[m.end() :].startswith("downsample.")
    kind = "bottleneck" if bottleneck else "basic"
    blocks = tuple(depths.get(s, 0) for s in range(1, max(depths, default=0) + 1))
    for arch, layout in _LAYOUTS.items():
        if layout == (kind, blocks):
            # option A has no parameters in its shortcuts; only the CIFAR family may lack projections
            shortcut = "A" if arch in _CIFAR_ARCHS and not projections else "B"
            return ResNetConfig(arch=arch, shortcut=shortcut)  # type: ignore[arg-type]
    raise ValueError(
        f"cannot recognise a supported ResNet in this state dict: {kind} blocks, {blocks} blocks per stage; "
        f"supported: {', '.join(f'{a} {b} {d}' for a, (b, d) in _LAYOUTS.items())}"
    )


def _expected_keys(cfg: ResNetConfig) -> list[str]:
    # Built on the meta device: names only, no memory and no random numbers drawn. Names depend on the arch
    # and the shortcut option, not on the stem or num_classes.
    with torch.device("meta"):
        return list(ResNet(ResNetConfig(arch=cfg.arch, shortcut=cfg.shortcut)).state_dict())


def convert_torchvision_state_dict(
    state_dict: Mapping[str, Tensor], cfg: ResNetConfig | None = None
) -> dict[str, Tensor]:
    """Map a torchvision ResNet state dict to llmlab's names (ours are torchvision's: the identity map).

    This is how pretrained torchvision checkpoints (`torchvision.models.resnet50(weights=...).state_dict()`
    or the downloaded .pth file) and timm ResNets from the Hugging Face Hub (same names) enter llmlab:
    `load_torchvision_weights(model, torch.load(path))`. Keys are validated against `cfg` (its arch and
    shortcut; the stem and num_classes do not change names) or, when cfg is None, against the arch inferred
    from the key layout: unknown or missing keys raise ValueError listing them. BN `num_batches_tracked`
    buffers may be absent (checkpoints saved before PyTorch 0.4.1 lack them); they are filled with 0, as
    BatchNorm's own loader does for such checkpoints. Transformers' `ResNetModel` layout
    (`resnet.encoder.stages.*`) is a different naming, not handled here.
    Returns a new dict holding the same tensors (no copies), in our (= torchvision's) key order.
    """
    keys = list(state_dict)
    if cfg is None:
        cfg = _infer_config(keys)
    expected = _expected_keys(cfg)
    expected_set, given = set(expected), set(keys)
    missing = [k for k in expected if k not in given and not k.endswith(_NUM_BATCHES)]
    unexpected = [k for k in keys if k not in expected_set]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match {cfg.arch} (shortcut {cfg.shortcut}): "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    converted: dict[str, Tensor] = {}
    for k in expected:
        if k in given:
            converted[k] = state_dict[k]
        else:  # a missing num_batches_tracked
            converted[k] = torch.tensor(0, dtype=torch.long)
    return converted


def load_torchvision_weights(model: ResNet, tv_state_dict: Mapping[str, Tensor]) -> ResNet:
    """Convert a torchvision-named state dict and load it into `model` strictly; returns `model`.

    Raises ValueError on unknown/missing keys (see convert_torchvision_state_dict) and on any shape mismatch,
    listing each offending tensor with both shapes (typically a different num_classes or stem).
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"expected an llmlab ResNet, got {type(model).__name__}")
    converted = convert_torchvision_state_dict(tv_state_dict, model.cfg)
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"shape mismatch loading into {model.cfg.arch} (stem={model.cfg.stem!r}, "
            f"num_classes={model.cfg.num_classes}): " + "; ".join(mismatched)
        )
    model.load_state_dict(converted, strict=True)
    return model
