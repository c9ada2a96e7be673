"""Stage 5 benchmark: time and peak memory of one self-attention layer vs sequence length, naive vs fused.

    python benchmarks/attention_cost.py --out runs/bench-attention-cost [--device cuda] [--max-len 4096]

One `llmlab.nn.attention.MultiHeadAttention` (d_model 256, 4 heads, batch 1 by default; no mask, dropout 0) on
a random input x [B, n, d], for n = 64, 128, ..., --max-len, through both paths with the same weights:
"naive" materialises the scores [B, h, n, n]; "fused" calls F.scaled_dot_product_attention (on a CPU a
flash-attention kernel: tiles, online softmax, nothing of size n² kept). Two passes per path: "fwd" is the
forward under torch.no_grad (inference), "fwd+bwd" is the forward with autograd plus the backward of a fixed
output gradient (gradients of the input and of the four projections; the weights' gradients, 4·d² values,
are a constant 1 MiB of its peak at d = 256). The derivation of the costs these curves should follow (FLOPs
8·n·d² + 4·n²·d, scores h·n² per sequence) is in docs/stage5-transformer.md.

Time: per n, the four variants are timed in interleaved repeats (--repeats), each repeat timing enough calls
to last --min-time seconds; the figure is the median over repeats of the mean call time. CUDA is
synchronised around every timed block.

Peak memory: the most tensor memory the call holds at once beyond what existed before it (inputs, weights).
On CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before. On a
CPU there is no such counter, so the call is run once more under torch.profiler with profile_memory=True,
which records every allocation and free made through PyTorch's CPU allocator (i.e. every tensor's storage,
including the fused kernels' work buffers) with its size and time; the peak is the maximum of the running
sum of those sizes in time order. The script checks this accounting at start on a known pattern of
allocations and frees whose peak is 5 MiB, and stops if it reads anything else. Not counted:
memory that libraries allocate outside PyTorch's allocator (BLAS / oneDNN scratch, thread stacks).
Process RSS is not usable for one op: its high-water mark (ru_maxrss, VmHWM) only grows over the process's
life, so earlier and larger calls hide later ones; the C allocator keeps freed memory (and may hand it out
again) without returning it to the OS, so RSS before a call is not the baseline of tensor memory; pages
count only once touched, so a tensor allocated but written in part is under-counted; and RSS also holds
code, libraries and caches. Sampling RSS from a thread would miss short peaks. (The profiler's figures were
checked once against RSS made usable for the purpose — glibc made to mmap every block of 64 KiB or more
(MALLOC_MMAP_THRESHOLD_=65536) so that frees go back to the OS, VmHWM reset through /proc/self/clear_refs
before each call, one thread: the two agreed within 0.3 MiB for all four variants at n = 1024, 2048 and 4096,
e.g. naive fwd+bwd at n = 4096: 784.25 vs 783.98 MiB. With glibc's defaults the same RSS reading gave 51 MiB
for a call whose tensors peak at 36 MiB, and 0 for the fused ones.)

A variant stops (the rest of its n are skipped, and the reason printed) when its next point would exceed
--mem-cap-mib or --time-cap seconds per call, predicted from its last points (the local growth exponent,
at least 1, at most 2). The fitted exponents are least-squares slopes of log(metric) vs log(n) over
n >= --fit-from: naive memory should fit ≈ 2, fused memory ≈ 1, and time tends to 2 for both as the n² FLOPs
take over (n > 2·d). Prints the setup (command, machine, torch, threads, date), a markdown table and the
exponents; writes attention_cost.png (log-log, time and memory vs n) and attention_cost.json (raw numbers)
to --out. Results go in docs/results.md and docs/stage5-transformer.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from torch.profiler import ProfilerActivity, profile

from llmlab.nn.attention import MultiHeadAttention
from llmlab.train.record import hardware_info

IMPLS = ("naive", "fused")
PASSES = ("fwd", "fwd+bwd")
MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STYLE = {"naive": "tab:red", "fused": "tab:blue", "fwd": "--", "fwd+bwd": "-"}


# -- peak memory ---------------------------------------------------------------------------------------------
def _profiler_peak(prof: profile) -> int:
    """Peak of the running sum of CPU allocations (+) and frees (-) recorded by the profiler, in bytes."""
    allocation = torch._C._profiler._EventType.Allocation
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """The most tensor memory fn holds at once beyond what existed before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _profiler_peak(prof)


def check_memory_accounting(device: torch.device) -> None:
    """A known pattern must read exactly its peak, else the profiler's records are not what we think."""

    def pattern() -> None:
        a = torch.empty(MIB, dtype=torch.uint8, device=device)
        b = torch.empty(2 * MIB, dtype=torch.uint8, device=device) * 2  # 2 + 2 MiB alive at once
        del a
        c = torch.empty(MIB, dtype=torch.uint8, device=device)  # peak: 1 + 2 + 2 = 5, then 2 + 1
        del b, c

    peak_bytes(pattern, device)  # once untimed: first-call allocations of the profiler itself
    got = peak_bytes(pattern, device)
    if abs(got - 5 * MIB) > 0.01 * MIB:  # exact on a CPU; CUDA's allocator may round a little
        raise SystemExit(f"memory accounting self-check failed: expected {5 * MIB} bytes, read {got}")


# -- one layer, four variants --------------------------------------------------------------------------------
class Case:
    """The layer, an input of n tokens and a fixed output gradient; `call(impl, pass_)` runs one variant."""

    def __init__(self, layer: MultiHeadAttention, n: int, args: argparse.Namespace, device, dtype) -> None:
        g = torch.Generator(device=device).manual_seed(n)
        self.layer = layer
        self.x = torch.randn(args.batch, n, args.d_model, device=device, dtype=dtype, generator=g)
        self.x_grad = self.x.clone().requires_grad_(True)  # [B, n, d]
        self.grad_out = torch.randn(self.x.shape, device=device, dtype=dtype, generator=g)  # [B, n, d]

    def reset(self) -> None:
        """Free the previous call's gradients, so that a call starts with nothing of its own allocated."""
        self.layer.zero_grad(set_to_none=True)
        self.x_grad.grad = None

    def call(self, impl: str, pass_: str) -> None:
        self.layer.impl = impl
        if pass_ == "fwd":
            with torch.no_grad():
                self.layer(self.x)
        else:
            out, _ = self.layer(self.x_grad)  # [B, n, d]
            out.backward(self.grad_out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(case: Case, impl: str, pass_: str, calls: int, device: torch.device) -> float:
    """Mean seconds per call over `calls` back-to-back calls."""
    case.reset()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        case.reset()
        case.call(impl, pass_)
    _sync(device)
    return (time.perf_counter() - t0) / calls


def predict(points: list[tuple[int, float]], n: int) -> float:
    """The metric at n from the last points, growing as n^p with p the last local exponent in [1, 2]."""
    (n1, v1) = points[-1]
    p = 2.0
    if len(points) >= 2 and points[-2][1] > 0 and v1 > 0:
        n0, v0 = points[-2]
        p = min(2.0, max(1.0, math.log(v1 / v0) / math.log(n1 / n0)))
    return v1 * (n / n1) ** p


def fit_exponent(ns: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) vs log(n); None with fewer than two points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values, strict=True) if v > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def attention_flops(n: int, d: int, batch: int, pass_: str) -> float:
    """8·n·d² + 4·n²·d per sequence forward; backward ≈ twice the forward (two matmuls per matmul)."""
    fwd = batch * (8 * n * d * d + 4 * n * n * d)
    return fwd if pass_ == "fwd" else 3 * fwd


def sdpa_backend(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel F.scaled_dot_product_attention picks for this shape (private API: best effort)."""
    try:
        from torch.nn.attention import SDPBackend

        dk = args.d_model // args.heads
        q = torch.zeros(args.batch, args.heads, 64, dk, device=device, dtype=dtype)
        choice = int(torch._fused_sdp_choice(q, q, q))
        return next(name for name, b in SDPBackend.__members__.items() if int(b) == choice)
    except Exception:  # informational only
        return "unknown"


def _fmt_exp(e: float | None) -> str:
    return "—" if e is None else f"{e:.2f}"


# -- output --------------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path, title: str) -> None:
    fig = Figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    for impl in IMPLS:
        for pass_ in PASSES:
            pts = [r for r in rows if r["impl"] == impl and r["pass"] == pass_]
            if not pts:
                continue
            ns = [r["n"] for r in pts]
            style = dict(color=STYLE[impl], linestyle=STYLE[pass_], marker="o", markersize=3)
            ax_t.plot(ns, [r["median_ms"] for r in pts], label=f"{impl} {pass_}", **style)
            mem = [(r["n"], r["peak_mib"]) for r in pts if r["peak_mib"] > 0]
            if mem:
                ax_m.plot(*zip(*mem, strict=True), label=f"{impl} {pass_}", **style)
    for ax, ylabel in ((ax_t, "time per call (ms, median)"), (ax_m, "peak memory beyond inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--min-len", type=int, default=64, help="first n; n doubles up to --max-len")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of calls per timed repeat")
    parser.add_argument("--mem-cap-mib", type=float, default=4096, help="skip points predicted above this")
    parser.add_argument("--time-cap", type=float, default=10.0, help="skip points predicted above s/call")
    parser.add_argument("--fit-from", type=int, default=512, help="fit exponents over n >= this")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-attention-cost"))
    parser.add_argument(
        "--quick", action="store_true", help="n up to 256, 2 repeats: seconds, to check it runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.max_len, args.repeats, args.min_time, args.fit_from = min(args.max_len, 256), 2, 0.02, 128
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    hw = hardware_info()
    started = datetime.datetime.now().astimezone()
    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"machine: {hw['gpu'] or hw['cpu']} ({hw['cpu_count']} CPU cores, {torch.get_num_threads()} torch "
        f"threads), {platform.platform()}; python {platform.python_version()}, torch {torch.__version__}; "
        f"{started:%Y-%m-%d %H:%M %Z}"
    )
    print(
        f"layer: MultiHeadAttention d_model {args.d_model}, {args.heads} heads, batch {args.batch}, "
        f"{args.dtype}, device {device}; fused backend: {sdpa_backend(args, device, dtype)}"
    )
    check_memory_accounting(device)
    print("memory accounting self-check: ok (known pattern read exactly 5 MiB)")

    torch.manual_seed(0)
    layer = MultiHeadAttention(args.d_model, args.heads, dropout=0.0).to(device, dtype)
    variants = [(impl, pass_) for impl in IMPLS for pass_ in PASSES]
    history: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {
        v: {"time": [], "mem": []} for v in variants
    }
    stopped: dict[tuple[str, str], str] = {}
    rows: list[dict] = []
    n = args.min_len
    while n <= args.max_len:
        case = Case(layer, n, args, device, dtype)
        live = []
        for v in variants:
            if v in stopped:
                continue
            hist = history[v]
            if hist["time"] and predict(hist["time"], n) > args.time_cap:
                stopped[v] = f"n={n} predicted > {args.time_cap:g} s per call"
            elif hist["mem"] and predict(hist["mem"], n) > args.mem_cap_mib * MIB:
                stopped[v] = f"n={n} predicted > {args.mem_cap_mib:g} MiB"
            else:
                live.append(v)
        if not live:
            break
        calls, peaks = {}, {}
        for v in live:
            case.reset()
            case.call(*v)  # warm-up: first-call allocations, kernel selection
            case.reset()
            peaks[v] = peak_bytes(functools.partial(case.call, *v), device)
            once = time_calls(case, *v, 1, device)
            calls[v] = max(1, math.ceil(args.min_time / max(once, 1e-9)))
        times: dict[tuple[str, str], list[float]] = {v: [] for v in live}
        for _ in range(args.repeats):  # interleaved, so that machine noise hits every variant alike
            for v in live:
                times[v].append(time_calls(case, *v, calls[v], device))
        for v in live:
            med = statistics.median(times[v])
            history[v]["time"].append((n, med))
            history[v]["mem"].append((n, peaks[v]))
            rows.append(
                {
                    "n": n,
                    "impl": v[0],
                    "pass": v[1],
                    "median_ms": 1000 * med,
                    "times_ms": [1000 * t for t in times[v]],
                    "calls_per_repeat": calls[v],
                    "peak_bytes": peaks[v],
                    "peak_mib": peaks[v] / MIB,
                    "gflops": attention_flops(n, args.d_model, args.batch, v[1]) / med / 1e9,
                }
            )
        del case
        n *= 2

    print("\n| n | variant | pass | median ms | peak MiB | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['impl']} | {r['pass']} | {r['median_ms']:.3g} | {r['peak_mib']:.3g} "
            f"| {r['gflops']:.3g} |"
        )
    for v, why in stopped.items():
        print(f"stopped {v[0]} {v[1]}: {why}")

    exponents = {}
    print(f"\nfitted exponents (least-squares slope of log metric vs log n, n >= {args.fit_from}):")
    print("| variant | pass | time exponent | memory exponent | points |")
    print("|---|---|---|---|---|")
    for v in variants:
        pts = [r for r in rows if (r["impl"], r["pass"]) == v and r["n"] >= args.fit_from]
        ns = [r["n"] for r in pts]
        t_exp = fit_exponent(ns, [r["median_ms"] for r in pts])
        m_exp = fit_exponent(ns, [r["peak_bytes"] for r in pts])
        exponents[f"{v[0]} {v[1]}"] = {"time": t_exp, "memory": m_exp, "points": len(pts)}
        print(f"| {v[0]} | {v[1]} | {_fmt_exp(t_exp)} | {_fmt_exp(m_exp)} | {len(pts)} |")

    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"one self-attention layer: d={args.d_model}, h={args.heads}, batch {args.batch}, {args.dtype}, "
        f"{device.type} ({torch.get_num_threads()} threads)"
    )
    plot(rows, args.out / "attention_cost.png", title)
    meta = {
        "command": f"python {shlex.join(sys.argv)}",
        "date": started.isoformat(timespec="seconds"),
        "hardware": hw,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "fused_backend": sdpa_backend(args, device, dtype),
    }
    stops = {f"{v[0]} {v[1]}": why for v, why in stopped.items()}
    record = {"meta": meta, "rows": rows, "stopped": stops, "exponents": exponents}
    (args.out / "attention_cost.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out / 'attention_cost.png'} and {args.out / 'attention_cost.json'}")


if __name__ == "__main__":
    main()
