"""Memory predictions and measurements for people: tables (Markdown, which also reads well in a terminal), a
stacked bar chart per strategy, and the run report's section "Memory: predicted vs measured" (written as
`sections/memory.md`, which llmlab/report picks up like any recipe section).

The accounting behind the numbers is in llmlab/memory/predict.py (Rajbhandari et al. 2020, ZeRO §3.1/§5) and
llmlab/memory/activations.py (Korthikanti et al. 2022, §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab.memory.predict import MemoryPrediction
from llmlab.report.markdown import DASH, md_table

__all__ = [
    "CHART_FILE",
    "SECTION_FILE",
    "comparison_table",
    "components_table",
    "fmt_bytes",
    "measured_table",
    "memory_section",
    "terms_table",
    "write_bar_chart",
]

SECTION_FILE = "sections/memory.md"
CHART_FILE = "memory.png"

# (component key, label, what it is)
COMPONENTS = [
    ("params", "parameters", "model weights held by this rank"),
    ("grads", "gradients", "held after backward, until the next zero_grad"),
    ("optimizer", "optimizer states", "Adam's moments (+ fp32 master weights, DeepSpeed's mixed precision)"),
    ("activations", "activations (saved)", "tensors autograd keeps from forward to backward"),
    ("activations_peak", "activations (peak)", "with checkpointing: + one block recomputed in backward"),
    ("param_copies", "autocast weight casts", "16-bit copies of the weights the Linears save (autocast)"),
    ("buffers", "DDP buckets", "DDP's gradient buckets (N > 1)"),
    ("transient", "stage-3 gathered params", "the root and one block gathered while they run"),
    ("host", "host (offloaded)", "optimizer states in CPU memory (offload)"),
]
_CHART = ["params", "grads", "optimizer", "activations_peak", "param_copies", "buffers", "transient"]
_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:pink", "tab:gray", "tab:olive"]


def fmt_bytes(n: Any) -> str:
    """1536 -> "1.5 KiB"; binary units, 3 significant figures."""
    if not isinstance(n, (int, float)):
        return DASH
    value, unit = float(n), "B"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, u
    if unit == "B":
        return f"{int(value):,} B"
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:,.0f} {unit}"


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{x:+.2%}"


def components_table(p: MemoryPrediction) -> str:
    """One row per component of one prediction (zero rows left out), with the total."""
    c = p.components()
    rows = [
        [label, fmt_bytes(c[key]), f"{c[key]:,}", note]
        for key, label, note in COMPONENTS
        if c.get(key) or key in ("params", "grads", "optimizer")
    ]
    total = p.total
    rows.append(["**total (peak)**", f"**{fmt_bytes(total)}**", f"{total:,}", "device memory of one step"])
    return md_table(["component", "size", "bytes", "what"], rows)


def terms_table(p: MemoryPrediction) -> str:
    """The activation terms: one transformer layer, then what the model saves once."""
    a = p.activations
    if a is None:
        return "_No activation model for this architecture._"
    rows = [["layer", t.name, t.formula, f"{t.bytes:,}"] for t in a.layer]
    rows.append(["layer", "**one layer**", "", f"**{a.layer_bytes:,}**"])
    rows += [["model", t.name, t.formula, f"{t.bytes:,}"] for t in a.checkpoint_inputs + a.model]
    rows.append(["model", "**saved at the end of forward**", "", f"**{a.stored:,}**"])
    return md_table(["where", "saved tensor", "bytes (formula)", "bytes"], rows)


def comparison_table(labelled: Sequence[tuple[str, MemoryPrediction]]) -> str:
    """Strategies side by side: the states, the activations' peak and the total per rank."""
    rows = []
    for label, p in labelled:
        c = p.components()
        rows.append(
            [
                label,
                fmt_bytes(c["params"]),
                fmt_bytes(c["grads"]),
                fmt_bytes(c["optimizer"]),
                fmt_bytes(p.states.total),
                fmt_bytes(c.get("activations_peak")),
                fmt_bytes(c.get("param_copies", 0) + c["buffers"] + c["transient"]),
                fmt_bytes(p.total),
            ]
        )
    headers = ["strategy", "params", "grads", "optimizer", "states", "activations", "other", "total"]
    return md_table(headers, rows)


def measured_table(comparison: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            r["label"],
            fmt_bytes(r.get("predicted")),
            fmt_bytes(r.get("measured")),
            _pct(r.get("rel_error")),
            DASH if r.get("goal") is None else f"±{r['goal']:.0%}",
        ]
        for r in comparison
    ]
    return md_table(["component", "predicted", "measured", "error", "goal"], rows)


def memory_section(record: dict[str, Any]) -> str:
    """The report section of a memory.json record (see llmlab/memory/measure.py `write_memory_record`)."""
    pred, meas = record.get("predicted") or {}, record.get("measured") or {}
    shape = pred.get("activation_shape") or {}
    setup = (
        f"Rank {pred.get('rank', 0)} of {pred.get('ranks', 1)}, strategy `{pred.get('strategy')}`, "
        f"{pred.get('precision')} on {pred.get('device')}, {pred.get('optimizer')}, "
        f"{pred.get('n_params', 0):,} parameters"
    )
    if shape:
        setup += (
            f"; micro-batch {shape.get('batch')} × {shape.get('seq')} tokens, {shape.get('attention')} "
            f"attention, checkpointing {'on' if shape.get('checkpointing') else 'off'}"
        )
    lines = [
        "## Memory: predicted vs measured",
        "",
        setup + f", measured at step {record.get('step', DASH)}.",
        "",
        measured_table(record.get("comparison", [])),
        "",
        "Predicted states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, §3.1, §5) for this "
        "strategy's layout; activations follow our per-layer derivation after Korthikanti et al. 2022 (§4) "
        "(llmlab/memory/). Measured: storage bytes of parameters, gradients and optimizer states after the "
        "step; tensors saved for backward in the first micro-batch, counted with saved-tensor hooks.",
    ]
    extra = []
    if meas.get("rss_peak") is not None:
        extra.append(f"process RSS high-water mark {fmt_bytes(meas['rss_peak'])}")
    if meas.get("cuda_max_allocated") is not None:
        extra.append(
            f"CUDA max allocated {fmt_bytes(meas['cuda_max_allocated'])} "
            f"(predicted peak {fmt_bytes(pred.get('total_bytes'))})"
        )
    if extra:
        lines += ["", "Whole process: " + "; ".join(extra) + "."]
    return "\n".join(lines) + "\n"


def write_bar_chart(path: Path | str, labelled: Sequence[tuple[str, MemoryPrediction]], title: str) -> Path:
    """Stacked bars of each prediction's components (MiB or GiB), one bar per label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    peak = max((p.total for _, p in labelled), default=1)
    scale, unit = (2**30, "GiB") if peak >= 2**30 else (2**20, "MiB")
    fig = Figure(figsize=(max(6.0, 0.8 * len(labelled) + 4.0), 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [label for label, _ in labelled]
    bottom = [0.0] * len(labelled)
    names = {key: label for key, label, _ in COMPONENTS}
    for key, color in zip(_CHART, _COLORS, strict=True):
        values = [p.components().get(key, 0) / scale for _, p in labelled]
        if not any(values):
            continue
        ax.bar(labels, values, bottom=bottom, color=color, label=names[key])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel(f"per-rank memory ({unit})")
    ax.set_title(title, fontsize="medium")
    for tick in ax.get_xticklabels():
        tick.set_rotation(30)
        tick.set_horizontalalignment("right")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
