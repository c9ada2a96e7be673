"""Batch augmentation: crops equal a naive per-sample reference, flips, normalisation equals torchvision's,
seeded determinism without the global RNG, dtypes and devices kept, and use as a TensorLoader transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from llmlab.data.augment import (
    CifarAugment,
    CifarEval,
    crop_at,
    crop_offsets,
    normalize,
    random_crop,
    random_hflip,
)
from llmlab.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from llmlab.data.loader import TensorLoader

CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DEVICES = ["cpu", *CUDA]


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def images(
    b: int = 16, c: int = 3, h: int = 32, w: int = 32, dtype=torch.uint8, seed: int = 0
) -> torch.Tensor:
    g = gen(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
    return torch.randn(b, c, h, w, generator=g).to(dtype)


def naive_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, padding: int, mode: str) -> torch.Tensor:
    """One sample at a time: pad (zeros, or numpy's "reflect"), then slice the window."""
    _, _, h, w = x.shape
    out = []
    for i in range(x.shape[0]):
        if mode == "constant":
            padded = F.pad(x[i], (padding,) * 4)  # [C, H + 2p, W + 2p]
        else:
            arr = x[i].cpu().numpy()
            padded = torch.from_numpy(
                np.pad(arr, ((0, 0), (padding, padding), (padding, padding)), "reflect")
            )
        y, xx = int(dy[i]), int(dx[i])
        out.append(padded[:, y : y + h, xx : xx + w].to(x.device))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------
# Crop
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["constant", "reflect"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("padding", [1, 4])
def test_random_crop_equals_naive_reference(mode, dtype, padding):
    x = images(24, h=12, w=10, dtype=dtype)
    dy, dx = crop_offsets(24, padding, gen(7))  # the offsets random_crop draws from the same seed
    out = random_crop(x, padding, gen(7), padding_mode=mode)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, naive_crop(x, dy, dx, padding, mode), rtol=0, atol=0)
    torch.testing.assert_close(crop_at(x, dy, dx, padding, mode), out, rtol=0, atol=0)


def test_crop_at_corners_and_centre():
    x = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4).repeat(3, 1, 1, 1)
    dy, dx = torch.tensor([2, 0, 4]), torch.tensor([2, 0, 4])
    out = crop_at(x, dy, dx, padding=2)
    assert torch.equal(out[0], x[0])  # offset == padding: the original image
    assert out[1, 0, :2].eq(0).all() and out[1, 0, :, :2].eq(0).all()  # shifted down-right, zeros top-left
    assert torch.equal(out[1, 0, 2:, 2:], x[0, 0, :2, :2])
    assert torch.equal(out[2, 0, :2, :2], x[0, 0, 2:, 2:]) and out[2, 0, 2:].eq(0).all()
    assert torch.equal(random_crop(x, 0, gen(0)), x)  # no padding: nothing to do


def test_offsets_cover_the_full_range():
    padding = 4
    dy, dx = crop_offsets(4000, padding, gen(1))
    assert set(dy.tolist()) == set(range(2 * padding + 1)) == set(dx.tolist())
    # end to end: all-ones images, zero padding; the zero rows/columns give each sample's shift
    x = torch.ones(4000, 1, 16, 16, dtype=torch.uint8)
    out = random_crop(x, padding, gen(2))
    rows, cols = out[:, 0].sum(dim=2).eq(0), out[:, 0].sum(dim=1).eq(0)  # [B, H] empty rows, [B, W]
    shift_y = rows[:, :padding].sum(1) * -1 + rows[:, -padding:].sum(1)  # dy - padding
    shift_x = cols[:, :padding].sum(1) * -1 + cols[:, -padding:].sum(1)
    assert set(shift_y.tolist()) == set(range(-padding, padding + 1)) == set(shift_x.tolist())


def test_bad_arguments():
    x = images(2)
    with pytest.raises(ValueError, match="padding_mode"):
        random_crop(x, 4, gen(0), padding_mode="edge")
    with pytest.raises(ValueError, match="reflect padding needs"):
        random_crop(images(2, h=4, w=4), 4, gen(0), padding_mode="reflect")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_hflip(x[0], gen(0))
    with pytest.raises(ValueError, match="3/3 values for 1 channels"):
        normalize(images(2, c=1), CIFAR10_MEAN, CIFAR10_STD)


# ---------------------------------------------------------------------------------------------------------
# Flip
# ---------------------------------------------------------------------------------------------------------


def test_random_hflip():
    x = images(64)
    assert torch.equal(random_hflip(x, gen(0), p=0.0), x)
    assert torch.equal(random_hflip(x, gen(0), p=1.0), x.flip(-1))
    out = random_hflip(x, gen(3))
    flipped = torch.rand(64, generator=gen(3)) < 0.5  # the draws it made
    assert 10 < int(flipped.sum()) < 54
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if flipped[i] else x[i])


# ---------------------------------------------------------------------------------------------------------
# Normalize
# ---------------------------------------------------------------------------------------------------------


def test_normalize_matches_torchvision():
    x = torch.rand(8, 3, 32, 32, generator=gen(0))
    before = x.clone()
    out = normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(out, TF.normalize(x, list(CIFAR10_MEAN), list(CIFAR10_STD)))
    assert torch.equal(x, before)  # the input is not modified
    u8 = images(8)
    out = normalize(u8, CIFAR10_MEAN, CIFAR10_STD)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, TF.normalize(u8.float() / 255, list(CIFAR10_MEAN), list(CIFAR10_STD)))
    half = normalize(x.half(), torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD))
    assert half.dtype == torch.float32
    cl = normalize(u8.contiguous(memory_format=torch.channels_last), CIFAR10_MEAN, CIFAR10_STD)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, out)


# ---------------------------------------------------------------------------------------------------------
# CifarAugment / CifarEval
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_cifar_augment_deterministic_and_device_preserving(device):
    x, y = images(32).to(device), torch.arange(32, device=device)
    aug = CifarAugment()
    rng_before = torch.get_rng_state()
    a_x, a_y = aug((x, y), gen(5, device))
    b_x, _ = aug((x, y), gen(5, device))
    c_x, _ = aug((x, y), gen(6, device))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not touched
    assert torch.equal(a_x, b_x) and not torch.equal(a_x, c_x)
    assert a_x.dtype == torch.float32 and a_x.shape == x.shape and a_x.device == x.device
    assert a_y is y
    # the same three steps by hand, from the same generator
    g = gen(5, device)
    manual = normalize(random_hflip(random_crop(x, 4, g), g), CIFAR10_MEAN, CIFAR10_STD)
    assert torch.equal(a_x, manual)
    cl, _ = CifarAugment(channels_last=True)((x, y), gen(5, device))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, a_x)
    e_x, e_y = CifarEval(channels_last=True)((x, y), gen(0, device))
    assert e_y is y and e_x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(e_x, normalize(x, CIFAR10_MEAN, CIFAR10_STD))


@pytest.mark.parametrize("device", CUDA)
def test_cuda_matches_cpu_for_the_same_offsets(device):
    x = images(32)
    dy, dx = crop_offsets(32, 4, gen(0))
    for mode in ("constant", "reflect"):
        on_gpu = crop_at(x.to(device), dy.to(device), dx.to(device), 4, mode)
        assert torch.equal(on_gpu.cpu(), crop_at(x, dy, dx, 4, mode))
    with pytest.raises(ValueError, match="generator is on"):
        random_crop(x.to(device), 4, gen(0))  # a CPU generator for CUDA images


def test_as_tensor_loader_transform():
    x, y = images(100), torch.arange(100)
    loader = TensorLoader((x, y), batch_size=32, shuffle=True, seed=3, transform=CifarAugment())
    first = list(loader)
    again = list(TensorLoader((x, y), batch_size=32, shuffle=True, seed=3, transform=CifarAugment()))
    assert len(first) == 4 and first[-1][0].shape == (4, 3, 32, 32)
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(la, lb)
    assert torch.equal(list(loader.iter_from(2))[0][0], first[2][0])  # a resumed epoch rebuilds batch 2
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], first[0][0])  # another epoch, other crops
    # labels still match their images: undo nothing, but the eval transform keeps the pairing exactly
    ev = TensorLoader((x, y), batch_size=32, shuffle=True, seed=3, transform=CifarEval())
    for bx, by in ev:
        torch.testing.assert_close(bx, normalize(x[by], CIFAR10_MEAN, CIFAR10_STD))
