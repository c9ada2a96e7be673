"""CIFAR-10 data path alone (no model): the one-time decode, then images/s through TensorLoader + transforms.

    python benchmarks/cifar_data.py --data-dir ../shared/data

Part 1 loads CIFAR-10 with a fresh, empty cache folder (so the source is read and decoded; checksum
verification included, as a first run does) and again from the safetensors cache it wrote. Part 2 runs
shuffled epochs of the 50000 training images (batch 512, the last partial batch kept) through
`TensorLoader` with no transform (gather only), `CifarEval` (normalize), `CifarAugment` (crop 4 + flip +
normalize) and `CifarAugment(channels_last=True)`, on the CPU and, when available, on CUDA (the uint8 tensors
moved to the GPU once; each epoch synchronised). A variant's figure is the median over `--repeats` epochs,
after one warm-up epoch; variants are interleaved repeat by repeat so machine noise hits them alike.
`--synthetic` uses random uint8 tensors of the same shapes instead of the data (the data path does not care
about pixel values). Prints markdown tables; results go in docs/results.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmlab.data.augment import CifarAugment, CifarEval
from llmlab.data.cifar10 import load_cifar10
from llmlab.data.loader import TensorLoader
from llmlab.train.record import hardware_info

BATCH = 512
VARIANTS = {
    "gather only": None,
    "CifarEval (normalize)": CifarEval(),
    "CifarAugment (crop+flip+normalize)": CifarAugment(),
    "CifarAugment, channels_last": CifarAugment(channels_last=True),
}


def decode_times(data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, float]], str]:
    saved = os.environ.get("LLMLAB_CACHE")
    with tempfile.TemporaryDirectory(prefix="llmlab-bench-cache-") as cache:
        os.environ["LLMLAB_CACHE"] = cache
        try:
            t0 = time.perf_counter()
            data = load_cifar10(data_dir, progress=False)
            t1 = time.perf_counter()
            data = load_cifar10(data_dir, progress=False)
            t2 = time.perf_counter()
        finally:
            if saved is None:
                os.environ.pop("LLMLAB_CACHE", None)
            else:
                os.environ["LLMLAB_CACHE"] = saved
    rows = [("first load: read, verify, decode, write cache", t1 - t0), ("cached load", t2 - t1)]
    return data.train_images, data.train_labels, rows, data.description()


def epoch_time(loader: TensorLoader, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in loader:
        last = batch[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    del last
    return time.perf_counter() - t0


def throughput(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, repeats: int
) -> dict[str, float]:
    images, labels = images.to(device), labels.to(device)
    loaders = {
        name: TensorLoader((images, labels), BATCH, shuffle=True, seed=0, transform=transform)
        for name, transform in VARIANTS.items()
    }
    for loader in loaders.values():  # warm-up: allocator, kernels, thread pools
        epoch_time(loader, device)
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(repeats):
        for name, loader in loaders.items():
            loader.set_epoch(r + 1)
            times[name].append(epoch_time(loader, device))
    return {name: len(images) / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="data root (default: $LLMLAB_DATA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per variant and device")
    parser.add_argument("--synthetic", action="store_true", help="random tensors instead of the data")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()

    hw = hardware_info()
    print(
        f"machine: {hw['cpu']}, {hw['cpu_count']} CPUs, torch threads {hw['torch_threads']}, "
        f"GPU {hw['gpu'] or 'none'}; torch {torch.__version__}"
    )
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (50000,), generator=g)
        print("data: synthetic uint8 [50000, 3, 32, 32]")
    else:
        images, labels, rows, description = decode_times(args.data_dir)
        print(f"data: {description}")
        print("\n| CIFAR-10 load | seconds |")
        print("|---|---|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.2f} |")

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    results = {d.type: throughput(images, labels, d, args.repeats) for d in devices}
    header = " | ".join(f"{d.type} (images/s)" for d in devices)
    print(f"\n| data path, batch {BATCH}, train epoch of {len(images)} | {header} |")
    print("|---|" + "---|" * len(devices))
    for name in VARIANTS:
        cells = " | ".join(f"{results[d.type][name]:,.0f}" for d in devices)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
