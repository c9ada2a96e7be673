"""Data augmentation on whole batches of image tensors: random crop with padding, horizontal flip, normalize.

Reference: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
section 4.2 (CIFAR-10): "4 pixels are padded on each side, and a 32x32 crop is randomly sampled from the
padded image or its horizontal flip" (zero padding), after subtracting the per-pixel mean; here the
per-channel mean/std normalisation of torchvision's `transforms.Normalize`, as most CIFAR recipes do.

Everything works on a batch [B, C, H, W] at once, on the batch's device (so on the GPU when training there),
for uint8 and float images, and draws only from the `torch.Generator` it is given (on the batch's device):
the same generator state gives the same output and the global RNG is never touched. `CifarAugment` and
`CifarEval` are `transform`s for `llmlab.data.loader.TensorLoader`, which seeds that generator per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmlab.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD

PADDING_MODES = ("constant", "reflect")


def _check_images(x: torch.Tensor, generator: torch.Generator | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the images are on {x.device}; "
            "pass torch.Generator(device=images.device)"
        )


def crop_offsets(
    batch: int, padding: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets (dy, dx), each int64 [batch] uniform in [0, 2*padding], dy drawn first."""
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    return dy, dx


def crop_at(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, padding: int, padding_mode: str = "constant"
) -> torch.Tensor:
    """Crop [H, W] windows at offsets (dy[b], dx[b]) of each image padded by `padding`; same shape as `x`.

    Pads every image by `padding` on each side (zeros, or a reflection without repeating the edge, as numpy's
    and torchvision's "reflect") and slices `[dy : dy + H, dx : dx + W]`: all samples in one indexing op on
    the view of every window of the padded batch (unfold makes it without copying).
    """
    _check_images(x)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    b, c, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding needs padding < image size, got {padding} for {h}x{w}")
    padded = F.pad(x, (padding,) * 4, mode=padding_mode)  # [B, C, H + 2p, W + 2p]
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # [B, C, 2p + 1, 2p + 1, H, W], a view
    batch = torch.arange(b, device=x.device)
    return windows[batch, :, dy.to(x.device), dx.to(x.device)]  # [B, C, H, W]


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator, padding_mode: str = "constant"
) -> torch.Tensor:
    """Pad each image by `padding` (zeros by default, as He et al.; or "reflect") and take a random crop of
    the original size at a per-sample offset in [0, 2*padding]^2. x: [B, C, H, W], any dtype; same device."""
    _check_images(x, generator)
    if padding == 0:
        return x
    dy, dx = crop_offsets(x.shape[0], padding, generator, x.device)
    return crop_at(x, dy, dx, padding, padding_mode)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability `p` (one draw per sample). x: [B, C, H, W]."""
    _check_images(x, generator)
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p  # [B]
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(x - mean) / std per channel, as float32; uint8 images are scaled to [0, 1] first. x: [B, C, H, W].

    The memory format of `x` is kept (channels_last stays channels_last).
    """
    _check_images(x)
    out = x.to(torch.float32)
    if x.dtype == torch.uint8:
        out = out.div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)  # [C, 1, 1]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    if mean_t.shape[0] != x.shape[1] or std_t.shape[0] != x.shape[1]:
        raise ValueError(f"mean/std have {mean_t.shape[0]}/{std_t.shape[0]} values for {x.shape[1]} channels")
    if out is x:  # float32 input: do not modify the caller's tensor
        out = out.clone(memory_format=torch.preserve_format)
    return out.sub_(mean_t).div_(std_t)


def _to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class CifarAugment:
    """The standard CIFAR training augmentation as a TensorLoader transform.

    `(images uint8 [B, 3, H, W], labels, ...), generator -> (float32 normalised images, labels, ...)`:
    random crop with `padding` (4), horizontal flip with probability `flip_p` (0.5), normalisation with
    `mean`/`std` (CIFAR-10's); `channels_last` returns images in that memory format (for convolutions on
    tensor cores). Runs on the images' device; the generator must be on it too.
    """

    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    padding: int = 4
    padding_mode: str = "constant"
    flip_p: float = 0.5
    channels_last: bool = False

    def __call__(
        self, batch: tuple[torch.Tensor, ...], generator: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        images, *rest = batch
        x = random_crop(images, self.padding, generator, self.padding_mode)  # crop and flip on uint8: cheaper
        x = random_hflip(x, generator, self.flip_p)
        x = _to_memory_format(x, self.channels_last)
        return (normalize(x, self.mean, self.std), *rest)


@dataclass
class CifarEval:
    """Normalisation only (evaluation), as a TensorLoader transform; the generator is not used."""

    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    channels_last: bool = False

    def __call__(
        self, batch: tuple[torch.Tensor, ...], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        images, *rest = batch
        return (normalize(_to_memory_format(images, self.channels_last), self.mean, self.std), *rest)
