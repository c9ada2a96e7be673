"""Stage 1 benchmark: time to 98% on MNIST for the autograd and the hand-derived MLP, and their step times.

    python benchmarks/mnist_mlp.py --data-dir ../shared/data --seeds 3 --bf16 --out runs/bench-mnist-mlp

Part 1 runs (or re-reads, when its run directory is complete) `llmlab run mnist-mlp` with the `default` and
`manual` presets (the same model, data, schedule and SGD update) for each seed and reads the training time at
which validation accuracy first reached 98% (evaluated each epoch), the final test accuracy and the total
training time. Part 2 times one Trainer.train_step of each implementation on the same batch (median over
repeats, after warm-up, implementations interleaved), and prints their ratio; with --bf16 also the autograd
step under bf16 autocast, to show why mixed precision is off by default on a CPU.
Prints markdown tables; results go in docs/results.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmlab.data.loader import TensorLoader
from llmlab.models.mlp import build_mlp
from llmlab.recipes.mnist_mlp import default as default_config
from llmlab.runner import run
from llmlab.train.config import ScheduleConfig, TrainConfig
from llmlab.train.optim import build_optimizer
from llmlab.train.record import hardware_info
from llmlab.train.tasks import ClassificationTask
from llmlab.train.trainer import Trainer

PRESETS = {"autograd": "default", "manual": "manual"}


def time_to_target(run_dir: Path, target: float) -> float | None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "val" and record["accuracy"] >= target:
            return record["time_s"]
    return None


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def part1(args: argparse.Namespace) -> None:
    rows = []
    for impl, preset in PRESETS.items():
        reach, test, total = [], [], []
        for seed in range(args.seeds):
            out = args.out / f"{impl}-seed{seed}"
            if not (out / "result.json").exists():
                run("mnist-mlp", preset, [f"seed={seed}"], out=out, device="cpu", data_dir=args.data_dir)
            result = json.loads((out / "result.json").read_text())
            t = time_to_target(out, args.target)
            if t is not None:
                reach.append(t)
            test.append(100 * result["metrics"]["test/accuracy"])
            total.append(result["train_time_s"])
        rows.append((impl, f"{len(reach)}/{args.seeds}", mean_std(reach), mean_std(test), mean_std(total)))
    print(
        f"\n| implementation | runs reaching {args.target:.0%} val | time to {args.target:.0%} val (s) "
        "| test accuracy (%) | training time (s) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def step_times(impl: str, steps: int, repeats: int, precision: str = "fp32") -> list[float]:
    cfg = default_config()
    cfg.model.impl = impl
    torch.manual_seed(0)
    model = build_mlp(cfg.model)
    optim = (
        cfg.optim if impl == "autograd" else type(cfg.optim)(**{**cfg.optim.__dict__, "name": "manual_sgd"})
    )
    optimizer = build_optimizer(model, optim)
    x, y = torch.randn(4096, 784), torch.randint(0, 10, (4096,))
    loader = TensorLoader((x, y), cfg.train.batch_size, shuffle=True, drop_last=True)
    trainer = Trainer(
        model,
        ClassificationTask(cfg.label_smoothing),
        optimizer,
        loader,
        TrainConfig(batch_size=cfg.train.batch_size, max_steps=10**6, precision="fp32"),
        ScheduleConfig(name="constant"),
    )
    batches = list(loader)
    for batch in batches[:20]:  # warm-up: allocator, thread pools
        trainer.train_step(batch)
    medians = []
    for _ in range(repeats):
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            trainer.train_step(batches[i % len(batches)])
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return medians


def part2(args: argparse.Namespace) -> None:
    # Interleave the implementations, repeat by repeat, so that machine noise hits both alike.
    variants = [("autograd", "fp32"), ("manual", "fp32")] + ([("autograd", "bf16")] if args.bf16 else [])
    results: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for impl, precision in variants:
            results[(impl, precision)] += step_times(impl, args.steps, 1, precision)
    print("\n| implementation | precision | step time, batch 128 (ms, median of per-repeat medians) |")
    print("|---|---|---|")
    for (impl, precision), values in results.items():
        runs = ", ".join(f"{1000 * v:.2f}" for v in values)
        print(f"| {impl} | {precision} | {1000 * statistics.median(values):.2f} (repeats: {runs}) |")
    auto = statistics.median(results[("autograd", "fp32")])
    manual = statistics.median(results[("manual", "fp32")])
    print(f"\nstep-time ratio manual / autograd (fp32): {manual / auto:.3f}")
    if args.bf16:
        bf16 = statistics.median(results[("autograd", "bf16")])
        print(f"step-time ratio bf16 autocast / fp32 (autograd): {bf16 / auto:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-mnist-mlp"))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-runs", action="store_true", help="only the step-time comparison")
    parser.add_argument("--bf16", action="store_true", help="also time the autograd step under bf16 autocast")
    args = parser.parse_args()
    hw = hardware_info()
    print(
        f"machine: {hw['cpu']} ({hw['cpu_count']} cores, {hw['torch_threads']} torch threads), "
        f"torch {torch.__version__}"
    )
    if not args.skip_runs:
        part1(args)
    part2(args)


if __name__ == "__main__":
    main()
