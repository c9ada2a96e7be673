"""Stage 8 scaling table: gpt-tp under several TP × DP layouts, and one markdown table of what they logged.

    python benchmarks/tp_scaling.py --out runs/tp-scaling                 # run the CPU layouts, then print
    python benchmarks/tp_scaling.py --summarize runs/tp-scaling/*        # print the table of existing runs

Layouts (the `cpu` preset unless --preset): one process with all the machine's threads; one process with one
thread (what each process of the torchrun layouts gets: torchrun sets OMP_NUM_THREADS=1); TP 2; TP 4;
TP 2 × DP 2 — each launched by torchrun, one after another (never two at once: on a small CPU they would slow
each other). Columns: tokens/s over the whole run, ms per step split into compute, TP collectives and the DP
all-reduce (averaged over the logged intervals; every collective timed), the communication share, TP bytes
all-reduced per step and rank (measured; this model's exact count; the Megatron paper's 4·L·b·s·h), MFU (peak
as llmlab/train/flops.py detects it), and the final validation loss (all layouts take the same steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

LAYOUTS = {  # name: (processes, tp, threads per process)
    "1proc-all-threads": (1, 1, None),
    "1proc-1thread": (1, 1, 1),
    "tp2": (2, 2, 1),
    "tp4": (4, 4, 1),
    "tp2xdp2": (4, 2, 1),
}


def launch(name: str, preset: str, out: Path, extra: list[str]) -> None:
    nproc, tp, threads = LAYOUTS[name]
    env = {**os.environ, "LLMLAB_PROGRESS": "0"}
    args = [
        "-m",
        "llmlab",
        "run",
        "gpt-tp",
        "--preset",
        preset,
        f"parallel.tp={tp}",
        "--out",
        str(out),
        *extra,
    ]
    if threads is None:  # plain python: torch takes every core
        env.pop("OMP_NUM_THREADS", None)
        cmd = [sys.executable, *args]
    else:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *args,
        ]
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True)


def summarize(run_dir: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())["config"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in rows if r["split"] == "train" and "step_s" in r]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in train if key in r]
        return sum(vals) / len(vals) if vals else None

    last = train[-1] if train else {}
    return {
        "run": run_dir.name,
        "tp": config["parallel"]["tp"],
        "engine": config["parallel"]["engine"],
        "processes": result["world_size"],
        "tokens_s": result["throughput"]["value"],
        "step_ms": 1e3 * (mean("step_s") or 0),
        "compute_ms": 1e3 * (mean("compute_s") or 0),
        "tp_ms": 1e3 * (mean("comm_tp_s") or 0),
        "dp_ms": 1e3 * (mean("comm_dp_s") or 0),
        "comm_share": mean("comm_share"),
        "tp_bytes": last.get("tp_allreduce_bytes"),
        "tp_bytes_exact": last.get("tp_allreduce_bytes_theory"),
        "tp_bytes_megatron": last.get("tp_allreduce_bytes_megatron"),
        "mfu": mean("mfu"),
        "val_loss": result["metrics"].get("val/loss"),
        "train_time_s": result["train_time_s"],
    }


def table(rows: list[dict]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    head = ("| run | TP × DP | tokens/s | ms/step | compute | TP comm | DP comm | comm share | TP bytes/step "
            "(measured = exact; Megatron 4·L·bsh) | MFU | val loss | train s |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        dp = r["processes"] // r["tp"]
        nbytes = "–"
        if r["tp_bytes"]:
            same = "=" if r["tp_bytes"] == r["tp_bytes_exact"] else "≠"
            mb = [r[k] / 1e6 for k in ("tp_bytes", "tp_bytes_exact", "tp_bytes_megatron")]
            nbytes = f"{mb[0]:.2f} MB {same} {mb[1]:.2f}; {mb[2]:.2f}"
        lines.append(
            f"| {r['run']} | {r['tp']} × {dp} | {r['tokens_s']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['compute_ms']:.1f} | {r['tp_ms']:.1f} | {r['dp_ms']:.1f} | {f(r['comm_share'], '.0%')} | "
            f"{nbytes} | "
            f"{f(r['mfu'], '.1%')} | {f(r['val_loss'], '.4f')} | {r['train_time_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="run the layouts into OUT/<layout> (skips layouts already run)")
    ap.add_argument("--summarize", nargs="*", type=Path, default=[], help="existing gpt-tp run directories")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument(
        "overrides", nargs="*", help="key=value overrides for every run (e.g. train.max_steps=100)"
    )
    args = ap.parse_args()
    dirs = list(args.summarize)
    if args.out is not None:
        for name in args.layouts.split(","):
            out = args.out / name
            if not (out / "result.json").is_file():
                launch(name, args.preset, out, args.overrides)
            dirs.append(out)
    if not dirs:
        ap.error("give --out (run the layouts) or --summarize RUN_DIR ...")
    print(table([summarize(d) for d in dirs]))


if __name__ == "__main__":
    main()
