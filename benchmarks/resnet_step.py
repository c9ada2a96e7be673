"""Stage 2 benchmark: training-step time of our ResNet-18 vs torchvision's, same batch, same device.

    python benchmarks/resnet_step.py --batch 128 --repeats 5 [--device cuda] [--precision bf16]

Both models use the CIFAR stem (3x3 stride-1 conv, no max-pool; torchvision's stem swapped the same way),
channels_last, and one SGD step per iteration (forward, cross-entropy, backward, update). The models are
timed in interleaved repeats so machine noise hits both alike; the figure is the median over repeats of the
median step time. Goal: ours / torchvision <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from llmlab.models.resnet import ResNetConfig, build_resnet


def torchvision_cifar_resnet18() -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, precision: str) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times = []
    for _ in range(steps):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {
        "llmlab": build_resnet(ResNetConfig(arch="resnet18", stem="cifar")),
        "torchvision": torchvision_cifar_resnet18(),
    }
    for m in models.values():
        m.to(device).to(memory_format=torch.channels_last).train()
    x = torch.randn(args.batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    for m in models.values():
        time_steps(m, x, y, args.warmup, args.precision)
    results: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            results[name].append(time_steps(m, x, y, args.steps, args.precision))
    print(
        f"device {device}, batch {args.batch}, {args.precision}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| model | step time (ms), median of repeats | repeats (ms) | images/s |")
    print("|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        print(
            f"| {name} | {1000 * med:.1f} | {', '.join(f'{1000 * v:.1f}' for v in values)} | "
            f"{args.batch / med:.0f} |"
        )
    ratio = statistics.median(results["llmlab"]) / statistics.median(results["torchvision"])
    print(f"\nratio llmlab / torchvision: {ratio:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
