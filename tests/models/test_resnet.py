"""Tests for llmlab.models.resnet: equal to torchvision's ResNets, the paper's CIFAR family, the converter.

Tolerances. Against torchvision (float64): both networks run the very same ATen kernels on the same shapes in
the same order, so logits, gradients and BN buffers come out bitwise equal (measured max difference: 0.0).
We still allow atol 1e-10 (rtol 0) so that a harmless change of summation order (rounding ~1e-15 at these
magnitudes: logits <~ 10, gradients <~ 150) could never fail the test, while any real difference — a moved
stride, a missing ReLU, another BN eps or momentum — changes values by 1e-4 or more.
channels_last vs contiguous (float64): different convolution loops, hence different summation orders;
measured differences ~5e-15, so 1e-10 again. bf16 autocast vs float32: bf16 keeps 8 significand bits
(~0.4% per rounding); over ~20 layers the logits drift by ~1-2% of their scale (measured 1.6%), so 10%.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from llmlab.models import (
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

DT = torch.float64
TOL = dict(rtol=0.0, atol=1e-10)  # see module docstring

# torchvision.models.resnet{18,34,50}(weights=None) with 1000 classes (torchvision's documented figures)
TV_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
RESNET18_CIFAR_PARAMS = 11_173_962  # 3x3 stem (1,728 instead of 9,408 weights) and a 10-class fc

# The paper's Table 6 (10 classes, option A): exact counts of our networks, and the rounded figures printed
# there. Option B adds two projections (16->32 and 32->64: 512 + 64 and 2,048 + 128 parameters) = 2,752.
CIFAR_PARAMS = {  # arch: (n, option A, option B, paper)
    "resnet20": (3, 269_722, 272_474, 0.27),
    "resnet32": (5, 464_154, 466_906, 0.46),
    "resnet44": (7, 658_586, 661_338, 0.66),
    "resnet56": (9, 853_018, 855_770, 0.85),
}


def _torchvision(
    arch: str, *, stem: str = "imagenet", num_classes: int = 1000, seed: int = 0, **kw
) -> nn.Module:
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kw)
    if stem == "cifar":  # the usual CIFAR adaptation of torchvision's network
        tv.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        tv.maxpool = nn.Identity()
    return tv


def _scramble_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine parameters and running statistics, so that eval mode tests them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(7)


def _twins(arch: str, stem: str, num_classes: int) -> tuple[nn.Module, ResNet]:
    """torchvision's network and ours with the same float64 weights, copied through the converter."""
    tv = _torchvision(arch, stem=stem, num_classes=num_classes, seed=0)
    _scramble_batchnorm(tv, seed=1)
    torch.manual_seed(2)  # another seed: only the converter can make the weights equal
    ours = build_resnet(ResNetConfig(arch=arch, stem=stem, num_classes=num_classes))
    load_torchvision_weights(ours, tv.state_dict())
    return tv.to(DT), ours.to(DT)


@pytest.fixture(scope="module")
def twins():
    """_twins, built once per module for each (arch, stem, num_classes): the train and eval tests share them
    (building costs more than the checks). Each check leaves both networks in the same state, so the order
    in which the tests run does not matter."""
    cache: dict[tuple, tuple[nn.Module, ResNet]] = {}

    def get(arch: str, stem: str, num_classes: int) -> tuple[nn.Module, ResNet]:
        key = (arch, stem, num_classes)
        if key not in cache:
            cache[key] = _twins(*key)
        return cache[key]

    return get


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return logits.detach(), grads, buffers


def _assert_equivalent(tv: nn.Module, ours: ResNet, hw: int, num_classes: int, train: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, hw, hw, dtype=DT, generator=g)
    y = torch.randint(0, num_classes, (2,), generator=g)
    steps_before = ours.bn1.num_batches_tracked.item()
    logits_tv, grads_tv, buffers_tv = _run(tv, x, y, train)
    logits, grads, buffers = _run(ours, x, y, train)

    torch.testing.assert_close(logits, logits_tv, **TOL)
    assert list(grads) == list(grads_tv)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_tv[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
        assert grad.abs().sum() > 0, name  # every parameter really takes part
    # train mode updated running_mean/var (momentum 0.1, unbiased variance) and num_batches_tracked; eval mode
    # left them alone. Either way both networks hold the same buffers.
    assert list(buffers) == list(buffers_tv)
    for name, buf in buffers.items():
        torch.testing.assert_close(buf, buffers_tv[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert buffers["bn1.num_batches_tracked"].item() == steps_before + int(train)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(arch="resnet101"), "arch"),
        (dict(stem="tiny"), "stem"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=2.5), "num_classes"),
        (dict(num_classes=True), "num_classes"),
        (dict(zero_init_residual=1), "zero_init_residual"),
        (dict(shortcut="C"), "shortcut"),
        (dict(arch="resnet20", stem="imagenet"), "stem"),  # the CIFAR family has no ImageNet stem
        (dict(arch="resnet18", shortcut="A"), "shortcut"),  # option A is for the CIFAR family only
        (dict(arch="resnet50", stem="imagenet", shortcut="A"), "shortcut"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ResNetConfig(**kwargs)


def test_config_defaults_and_revalidation_on_build():
    assert ResNetConfig() == ResNetConfig(
        arch="resnet18", stem="cifar", num_classes=10, zero_init_residual=False, shortcut="B"
    )
    cfg = ResNetConfig(arch="resnet20", shortcut="A")
    cfg.arch = "resnet18"  # a field changed after construction: build_resnet checks again
    with pytest.raises(ValueError, match="shortcut"):
        build_resnet(cfg)


# ----------------------------------------------------------------------------------------------------------
# ImageNet family against torchvision
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,zero_init",
    [("resnet18", False), ("resnet34", False), ("resnet50", False), ("resnet18", True), ("resnet50", True)],
)
def test_same_seed_same_names_same_weights_as_torchvision(arch, zero_init):
    # Names, order, shapes and the initialisation scheme at once: with the same seed, torchvision and we draw
    # the same random numbers into the same tensors, and zero_init_residual zeroes the same gammas.
    tv = _torchvision(arch, seed=11, zero_init_residual=zero_init)
    torch.manual_seed(11)
    ours = build_resnet(
        ResNetConfig(arch=arch, stem="imagenet", num_classes=1000, zero_init_residual=zero_init)
    )
    assert count_parameters(ours) == count_parameters(tv) == TV_PARAMS[arch]
    sd_tv, sd = tv.state_dict(), ours.state_dict()
    assert list(sd) == list(sd_tv)
    for name, value in sd.items():
        assert value.dtype == sd_tv[name].dtype and torch.equal(value, sd_tv[name]), name

    last_bn = "bn3" if arch == "resnet50" else "bn2"
    zero_gammas = [n for n, v in sd.items() if n.endswith(".weight") and v.dim() == 1 and not v.any()]
    blocks = [n for n, m in ours.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert zero_gammas == ([f"{b}.{last_bn}.weight" for b in blocks] if zero_init else [])


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_imagenet_stem_matches_torchvision(arch, train, twins):
    # 48x48 inputs leave 2x2 maps at layer4 (48 -> 12, 12, 6, 3, 2): train-mode BN still averages 8 values
    tv, ours = twins(arch, "imagenet", 1000)
    assert count_parameters(ours) == count_parameters(tv) == TV_PARAMS[arch]
    assert isinstance(ours.maxpool, nn.MaxPool2d)
    _assert_equivalent(tv, ours, hw=48, num_classes=1000, train=train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cifar_stem_resnet18_matches_torchvision_with_swapped_stem(train, twins):
    tv, ours = twins("resnet18", "cifar", 10)
    assert count_parameters(ours) == count_parameters(tv) == RESNET18_CIFAR_PARAMS
    assert isinstance(ours.maxpool, nn.Identity) and ours.conv1.kernel_size == (3, 3)
    _assert_equivalent(tv, ours, hw=32, num_classes=10, train=train)


def test_bottleneck_strides_on_its_3x3_conv():
    # ResNet v1.5 (torchvision): the first block of layer2..4 strides in conv2, not in the 1x1 conv1
    block = build_resnet(ResNetConfig(arch="resnet50", stem="imagenet")).layer2[0]
    assert (block.conv1.stride, block.conv2.stride, block.conv3.stride) == ((1, 1), (2, 2), (1, 1))
    assert block.downsample[0].stride == (2, 2)


# ----------------------------------------------------------------------------------------------------------
# CIFAR family (§4.2)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(CIFAR_PARAMS))
def test_cifar_family_parameter_counts_and_shapes(arch):
    n, count_a, count_b, paper = CIFAR_PARAMS[arch]
    torch.manual_seed(0)
    model_a = build_resnet(ResNetConfig(arch=arch, shortcut="A"))
    model_b = build_resnet(ResNetConfig(arch=arch, shortcut="B"))
    assert count_parameters(model_a) == count_a and round(count_a / 1e6, 2) == paper
    assert count_parameters(model_b) == count_b > count_a
    assert count_parameters(model_a, trainable_only=True) == count_a

    # 6n+2 weighted layers: 6n+1 convs and the fc, plus no projection convs under option A
    convs = [m for m in model_a.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 6 * n + 2
    assert [len(getattr(model_a, s)) for s in ("layer1", "layer2", "layer3")] == [n, n, n]
    assert not hasattr(model_a, "layer4") and isinstance(model_a.maxpool, nn.Identity)
    # A and B differ exactly by the two projections' parameters and buffers
    extra = set(model_b.state_dict()) - set(model_a.state_dict())
    assert {k.split(".downsample.")[0] for k in extra} == {"layer2.0", "layer3.0"}
    assert set(model_a.state_dict()) < set(model_b.state_dict())

    # 32x32 maps in stage 1, 16x16 in stage 2, 8x8 in stage 3 (Table in §4.2)
    shapes = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: a forward hook's return value would replace output
            shapes[name] = tuple(output.shape)

        return hook

    hooks = [getattr(model_a, s).register_forward_hook(record(s)) for s in ("layer1", "layer2", "layer3")]
    model_a.eval()
    with torch.no_grad():
        out = model_a(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 10)
    assert shapes == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}


def test_option_a_shortcut_is_a_padded_strided_identity():
    sc = PaddedIdentityShortcut(2, 5, stride=2)
    assert count_parameters(sc) == 0 and not list(sc.buffers())
    x = torch.randn(3, 2, 5, 5, dtype=DT, requires_grad=True)
    out = sc(x)
    assert out.shape == (3, 5, 3, 3)  # ceil(5 / 2) = 3, the grid of a stride-2 3x3 conv with padding 1
    assert torch.equal(out[:, :2], x[:, :, ::2, ::2]) and not out[:, 2:].any()

    # Gradients: only the kept pixels of the input receive any, and they receive exactly the gradient of the
    # first in_channels output channels; what arrives on the padded channels goes nowhere.
    grad_out = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad_out)
    expected = torch.zeros_like(x)
    expected[:, :, ::2, ::2] = grad_out[:, :2]
    assert torch.equal(grad_x, expected)
    (grad_pad_only,) = torch.autograd.grad(out[:, 2:].sum(), x)
    assert not grad_pad_only.any()
    # and the analytic Jacobian is the numerical one
    assert torch.autograd.gradcheck(sc, (torch.randn(2, 2, 4, 4, dtype=DT, requires_grad=True),))


def test_option_a_block_gradcheck():
    # A tiny downsampling BasicBlock with option A: finite differences agree with autograd for the input and
    # every parameter (train-mode BN, float64; gradcheck's default eps 1e-6 / atol 1e-5).
    torch.manual_seed(0)
    block = BasicBlock(2, 4, stride=2, shortcut="A").to(DT).train()
    assert isinstance(block.downsample, PaddedIdentityShortcut)
    x = torch.randn(2, 2, 4, 4, dtype=DT, requires_grad=True)
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("arch", ["resnet20", "resnet50"])
def test_zero_init_residual_blocks_start_as_their_shortcut(arch):
    stem = "cifar" if arch == "resnet20" else "imagenet"
    shortcut = "A" if arch == "resnet20" else "B"
    torch.manual_seed(0)
    model = build_resnet(
        ResNetConfig(arch=arch, stem=stem, shortcut=shortcut, zero_init_residual=True)
    ).eval()
    block = model.layer2[1]  # not the first block: its shortcut is the identity
    assert not block.residual_bn.weight.any()
    x = torch.rand(2, block.conv1.in_channels, 8, 8)  # non-negative, like any block input (after a ReLU)
    with torch.no_grad():
        assert torch.equal(block(x.clone()), x)


# ----------------------------------------------------------------------------------------------------------
# Memory format and mixed precision
# ----------------------------------------------------------------------------------------------------------
def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_resnet(ResNetConfig(arch="resnet18", stem="cifar")).to(DT)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=DT, generator=g)  # 16x16 keeps the float64 NHWC path fast
    y = torch.randint(0, 10, (2,), generator=g)
    logits, grads, _ = _run(model, x, y, train=True)
    seen = {}
    hook = model_cl.layer3.register_forward_hook(lambda m, i, o: seen.update(out=o))
    logits_cl, grads_cl, _ = _run(model_cl, x.contiguous(memory_format=torch.channels_last), y, train=True)
    hook.remove()
    assert seen["out"].is_contiguous(memory_format=torch.channels_last)  # the NHWC path really ran
    torch.testing.assert_close(logits_cl, logits, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_cl[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "cfg", [ResNetConfig(), ResNetConfig(arch="resnet20", shortcut="A")], ids=["r18", "r20A"]
)
def test_autocast_bf16(cfg):
    torch.manual_seed(0)
    model = build_resnet(cfg).to(memory_format=torch.channels_last).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), generator=g)
    with torch.no_grad():
        ref = model(x)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 10)
    assert (logits.float() - ref).abs().max() <= 0.1 * ref.abs().max()  # see module docstring
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------------------------------------
# Converter
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tv18_state() -> dict[str, torch.Tensor]:
    return _torchvision("resnet18", num_classes=10, seed=0).state_dict()


def test_converter_is_the_identity_on_names_and_infers_the_arch(tv18_state):
    converted = convert_torchvision_state_dict(tv18_state)
    assert list(converted) == list(tv18_state)
    assert all(converted[k] is tv18_state[k] for k in tv18_state)  # no copies
    for arch in ("resnet34", "resnet50"):
        with torch.device("meta"):
            sd = _torchvision(arch).state_dict()
        assert list(convert_torchvision_state_dict(sd)) == list(sd)
    for shortcut in ("A", "B"):  # our CIFAR family is recognised too, with either shortcut option
        torch.manual_seed(0)
        src = build_resnet(ResNetConfig(arch="resnet20", shortcut=shortcut))
        assert list(convert_torchvision_state_dict(src.state_dict())) == list(src.state_dict())
        dst = load_torchvision_weights(
            build_resnet(ResNetConfig(arch="resnet20", shortcut=shortcut)), src.state_dict()
        )
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())
        other = "B" if shortcut == "A" else "A"
        with pytest.raises(ValueError, match="missing keys" if other == "B" else "unexpected keys"):
            load_torchvision_weights(
                build_resnet(ResNetConfig(arch="resnet20", shortcut=other)), src.state_dict()
            )


def test_converter_rejects_missing_and_unexpected_keys(tv18_state):
    missing = dict(tv18_state)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \['layer3.1.bn2.running_var'\]"):
        convert_torchvision_state_dict(missing)
    extra = dict(tv18_state)
    extra["layer1.0.se.fc.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['layer1.0.se.fc.weight'\]"):
        convert_torchvision_state_dict(extra)
    with pytest.raises(ValueError, match="resnet34"):  # an explicit arch checks against that arch
        convert_torchvision_state_dict(tv18_state, ResNetConfig(arch="resnet34"))
    deeper = dict(tv18_state)
    deeper["layer3.5.conv1.weight"] = torch.zeros(1)  # a layout we do not build (e.g. resnet101's)
    with pytest.raises(ValueError, match="cannot recognise"):
        convert_torchvision_state_dict(deeper)
    with pytest.raises(ValueError, match="unexpected keys"):  # a DataParallel prefix is not guessed away
        convert_torchvision_state_dict(
            {f"module.{k}": v for k, v in tv18_state.items()}, ResNetConfig(arch="resnet18")
        )


def test_load_rejects_shape_mismatches_with_both_shapes(tv18_state):
    model = build_resnet(ResNetConfig(arch="resnet18", stem="cifar", num_classes=100))
    with pytest.raises(ValueError, match=r"fc.weight: checkpoint \(10, 512\) vs model \(100, 512\)"):
        load_torchvision_weights(model, tv18_state)
    cifar10 = build_resnet(ResNetConfig(arch="resnet18", stem="cifar", num_classes=10))
    with pytest.raises(
        ValueError, match=r"conv1.weight: checkpoint \(64, 3, 7, 7\) vs model \(64, 3, 3, 3\)"
    ):
        load_torchvision_weights(cifar10, tv18_state)  # an ImageNet-stem checkpoint into a CIFAR stem
    with pytest.raises(TypeError):
        load_torchvision_weights(torchvision.models.resnet18(), tv18_state)


def test_load_legacy_checkpoint_without_num_batches_tracked(tv18_state):
    legacy = {k: v for k, v in tv18_state.items() if not k.endswith("num_batches_tracked")}
    model = build_resnet(ResNetConfig(arch="resnet18", stem="imagenet", num_classes=10))
    load_torchvision_weights(model, legacy)
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == 0, name
        else:
            assert torch.equal(value, tv18_state[name]), name
