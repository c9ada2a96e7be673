"""Stage 6 memory table: per-rank memory of GPT-2 124M under every engine, predicted vs measured.

    python benchmarks/memory_table.py [--procs 1,2,4] [--steps 3] [--block 256] [--micro 2]
                                      [--configs fp32,bf16,ckpt,zero1,...] [--out runs/memory-table]
    python benchmarks/memory_table.py --model smoke --procs 1,2      # seconds: checks the script

Each row is a short run (`--steps` optimizer steps) of `shakespeare-gpt` with GPT-2 124M's architecture
(12 layers, 12 heads, 768 wide, GPT-2's BPE: Ψ = 124.4 M; `--model gpt2-medium`: 24 × 16 × 1024, 355 M)
on `--procs` gloo processes under torchrun, with
`--micro` sequences of `--block` tokens per process (the global batch grows with the processes, so every
rank does the same work). The run's own `memory.json` (llmlab/memory: the first step's parameter, gradient,
optimizer-state and saved-activation bytes of rank 0, next to `llmlab memory`'s prediction) gives the
columns; the step time is the mean over the steps after the first (`metrics.jsonl`), and RSS the process's
high-water mark. Prints a markdown table and writes it with a bar chart to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "ckpt": ["train.activation_checkpointing=true"],
    "zero1": ["train.strategy=zero1"],
    "zero2": ["train.strategy=zero2"],
    "zero3": ["train.strategy=zero3"],
    "fsdp2": ["train.strategy=fsdp2"],
    "ds1": ["train.strategy=deepspeed", "train.ds_stage=1"],
    "ds2": ["train.strategy=deepspeed", "train.ds_stage=2"],
    "ds3": ["train.strategy=deepspeed", "train.ds_stage=3"],
    "ds2-offload": ["train.strategy=deepspeed", "train.ds_stage=2", "train.offload=optimizer"],
    "ds3-bf16": ["train.strategy=deepspeed", "train.ds_stage=3", "train.precision=bf16"],
}
NEEDS_PROCESSES = {"zero1", "zero2", "zero3"}  # ours shards only over 2+ processes
MODELS = {
    "gpt2": ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "data.tokenizer=gpt2"],
    "gpt2-medium": ["model.n_layer=24", "model.n_head=16", "model.n_embd=1024", "data.tokenizer=gpt2"],
    "smoke": [],
}


def run_one(name: str, procs: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{name}-p{procs}"
    preset = "smoke" if args.model == "smoke" else "cpu"
    overrides = [
        *MODELS[args.model], *CONFIGS[name], f"model.block_size={args.block}",
        f"train.batch_size={args.micro * procs}", f"train.max_steps={args.steps}", "train.log_every=1",
        "train.eval_every=0", "train.checkpoint_every=-1", "data.eval_batches=1", "samples.count=0",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd += ["-m", "llmlab", "run", "shakespeare-gpt", "--preset", preset, "--device", "cpu"]
    cmd += ["--out", str(out)]
    env = {**os.environ, "LLMLAB_PROGRESS": "0", "OMP_NUM_THREADS": str(max(1, args.threads // procs))}
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, *overrides], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"name": name, "procs": procs, "error": done.stderr.strip().splitlines()[-1:]}
    mem = json.loads((out / "memory.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in rows if r["split"] == "train"]
    steps = [b - a for a, b in zip(times, times[1:], strict=False)] or times
    return {
        "name": name,
        "procs": procs,
        "predicted": mem["predicted"]["bytes"],
        "measured": mem["measured"],
        "step_s": sum(steps) / len(steps),
        "wall_s": time.perf_counter() - t0,
    }


def _mib(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**20:,.1f}"


def table(results: list[dict]) -> str:
    head = "| config | procs | params MiB (pred / meas) | grads | optimizer | activations | param copies"
    head += " | RSS MiB | step s |"
    lines = [head, "|---|---:|---|---|---|---|---|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['procs']} | failed: {' '.join(r['error'])} | | | | | | |")
            continue
        p, m = r["predicted"], r["measured"]
        parts = ("params", "grads", "optimizer", "activations", "param_copies")
        cells = [f"{_mib(p.get(k))} / {_mib(m.get(k))}" for k in parts]
        lines.append(
            f"| {r['name']} | {r['procs']} | " + " | ".join(cells)
            + f" | {_mib(m.get('rss_peak'))} | {r['step_s']:.2f} |"
        )  # fmt: skip
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    labels = [f"{r['name']}\n×{r['procs']}" for r in ok]
    parts = ("params", "grads", "optimizer", "activations")
    fig, ax = plt.subplots(figsize=(max(6, len(ok) * 0.8), 4))
    bottom = [0.0] * len(ok)
    for part in parts:
        values = [r["measured"].get(part, 0) / 2**20 for r in ok]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("MiB per rank (measured, rank 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2, help="sequences per process per step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="runs/memory-table")
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}: choose from {', '.join(CONFIGS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for procs in (int(p) for p in args.procs.split(",")):
        for name in args.configs.split(","):
            if procs == 1 and name in NEEDS_PROCESSES:
                continue
            results.append(run_one(name, procs, args))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    (Path(args.out) / "memory-table.md").write_text(text + "\n")
    chart(results, Path(args.out) / "memory-table.png")
    print(text)


if __name__ == "__main__":
    main()
