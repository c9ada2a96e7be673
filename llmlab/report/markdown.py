"""Markdown from run records: a blog-ready report.md per run, a comparison table across runs, and mean ± std
over seeds for groups of runs that differ only in their seed.

Every field of result.json is optional here: a missing value renders as "—", never as an error, so a run that
is still going (or was killed) still gets a report built from what exists.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.report.curves import CURVES_FILE, write_curves
from llmlab.report.run import (
    RunRecord,
    as_run,
    is_finite_number,
    is_fraction_metric,
    is_number,
    last_logged_metrics,
    metric_sort_key,
)

REPORT_FILE = "report.md"
SECTIONS_DIR = "sections"
DASH = "—"
MET = {True: "✅", False: "❌", None: DASH}
SPECIAL_GROUP_KEYS = ("recipe", "preset")


# ---------------------------------------------------------------------------------------------------------
# Formatting of single values
# ---------------------------------------------------------------------------------------------------------


def fmt_metric(name: str, value: Any) -> str:
    """A metric value for humans: accuracy-like fractions as %, other floats to 4 significant digits."""
    if not is_number(value):
        return DASH
    if not math.isfinite(value):
        return str(value)
    if is_fraction_metric(name, [value]):
        return f"{value:.2%}"
    return fmt_float(value)


def fmt_float(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value == 0 or abs(value) >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.3e}"


def fmt_params(n: Any) -> str:
    """109386 → "109.4K"; 124439808 → "124.4M"."""
    if not is_number(n):
        return DASH
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(int(n))


def fmt_count(n: Any) -> str:
    return f"{int(n):,}" if is_finite_number(n) else DASH


def fmt_duration(seconds: Any) -> str:
    if not is_finite_number(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def fmt_memory(mb: Any) -> str:
    if not is_finite_number(mb):
        return DASH
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:,.0f} MB"


def fmt_throughput(throughput: Any) -> str:
    """result.json's {"value": 1234.5, "unit": "samples/s"} (or a bare number) → "1,234 samples/s"."""
    unit = ""
    if isinstance(throughput, dict):
        unit = throughput.get("unit") or ""
        throughput = throughput.get("value")
    if not is_finite_number(throughput):
        return DASH
    text = f"{throughput:,.0f}" if throughput >= 100 else f"{throughput:.3g}"
    return f"{text} {unit}".strip()


def fmt_epochs(epochs: Any) -> str:
    return f"{epochs:.4g}" if is_finite_number(epochs) else DASH


def fmt_config_value(value: Any) -> str:
    """Strings as-is, everything else as JSON (the way config.json spells it)."""
    return value if isinstance(value, str) else json.dumps(value)


def fmt_text(value: Any) -> str:
    if value is None or value == "":
        return DASH
    return str(value)


def pretty_metric(name: str) -> str:
    """ "test/accuracy" → "test accuracy"."""
    return name.replace("/", " ").replace("_", " ")


# ---------------------------------------------------------------------------------------------------------
# Markdown tables
# ---------------------------------------------------------------------------------------------------------

_NUMERIC_CELL = re.compile(r"^\**[-+]?(\d|nan|inf)")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align_numbers: bool = True) -> str:
    """A padded GitHub-flavoured table; columns whose cells are all numbers (or "—") align right unless
    align_numbers is False."""
    header = [_cell(h) for h in headers]
    body = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(header[i])] + [len(r[i]) for r in body]) for i in range(len(header))]
    right = [align_numbers and _is_numeric_column([r[i] for r in body]) for i in range(len(header))]
    lines = [_row([h.ljust(w) for h, w in zip(header, widths, strict=True)])]
    lines.append(_row([("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right, strict=True)]))
    for r in body:
        cells = zip(r, widths, right, strict=True)
        lines.append(_row([c.rjust(w) if rt else c.ljust(w) for c, w, rt in cells]))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _is_numeric_column(cells: list[str]) -> bool:
    values = [c for c in cells if c != DASH]
    return bool(values) and all(_NUMERIC_CELL.match(c) for c in values)


# ---------------------------------------------------------------------------------------------------------
# Facts about one run, with fallbacks to metrics.jsonl when result.json is absent
# ---------------------------------------------------------------------------------------------------------


def _result(record: RunRecord, key: str) -> Any:
    return (record.result or {}).get(key)


def _steps(record: RunRecord) -> Any:
    steps = _result(record, "steps")
    if steps is None and record.metrics:
        steps = max(line["step"] for line in record.metrics)
    return steps


def _epochs(record: RunRecord) -> Any:
    epochs = _result(record, "epochs")
    if epochs is None:
        logged = [line["epoch"] for line in record.metrics if is_number(line.get("epoch"))]
        epochs = max(logged) if logged else None
    return epochs


def _status_text(record: RunRecord) -> str:
    if record.result is None:
        return "no result.json (still running, or killed)"
    return record.status or DASH


def _report_metrics(record: RunRecord) -> dict[str, float]:
    """result.json's final metrics, plus the last logged train metrics it does not already carry."""
    metrics = dict(record.final_metrics())
    for key, value in last_logged_metrics(record.metrics).items():
        if key.startswith("train/"):
            metrics.setdefault(key, value)
    return dict(sorted(metrics.items(), key=lambda kv: metric_sort_key(kv[0])))


@dataclass
class Verdict:
    """A run's standing against its target; every field may be unknown."""

    metric: str | None
    achieved: float | None
    value: float | None
    higher_is_better: bool
    met: bool | None

    @property
    def bound(self) -> str:
        op = "≥" if self.higher_is_better else "≤"
        return f"{op}{fmt_metric(self.metric or '', self.value)}"


def verdict(record: RunRecord) -> Verdict:
    target = record.target()
    metric = target.get("metric") if isinstance(target.get("metric"), str) else None
    achieved = target.get("achieved")
    if not is_number(achieved) and metric is not None:
        achieved = record.final_metrics().get(metric)
    value = target.get("value") if is_number(target.get("value")) else None
    higher = target.get("higher_is_better") is not False
    met = target.get("met")
    if not isinstance(met, bool):
        met = None
        if is_finite_number(achieved) and value is not None:
            met = achieved >= value if higher else achieved <= value
    return Verdict(metric, achieved if is_number(achieved) else None, value, higher, met)


def headline(record: RunRecord) -> str:
    """E.g. "test accuracy 98.42% — target ≥98.00% met ✅"."""
    v = verdict(record)
    if v.metric is None:
        return _headline_without_target(record)
    measured = fmt_metric(v.metric, v.achieved) if v.achieved is not None else "not measured"
    if v.value is None:
        return f"{pretty_metric(v.metric)} {measured}"
    outcome = {True: "met ✅", False: "not met ❌", None: "not evaluated"}[v.met]
    return f"{pretty_metric(v.metric)} {measured} — target {v.bound} {outcome}"


def _headline_without_target(record: RunRecord) -> str:
    metrics = record.final_metrics()
    if not metrics:
        return "no metrics recorded yet"
    # Prefer a held-out quality metric: test before val before train, non-loss before loss.
    rank = {"test": 0, "val": 1, "train": 2}
    name = min(metrics, key=lambda k: (rank.get(k.partition("/")[0], 3), k.endswith("/loss"), k))
    return f"{pretty_metric(name)} {fmt_metric(name, metrics[name])}"


# ---------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------


def write_report(run: RunRecord | str | Path) -> Path:
    """Write report.md (and curves.png when missing or older than metrics.jsonl) into the run directory."""
    record = as_run(run)
    curves = _ensure_curves(record)
    sections = [
        _title_section(record),
        _summary_section(record),
        _results_section(record),
        *_recipe_sections(record),
        _curves_section(record, curves),
        _performance_section(record),
        _config_section(record),
        _environment_section(record),
        _notes_section(record),
    ]
    out = record.path / REPORT_FILE
    out.write_text("\n\n".join(s for s in sections if s) + "\n", encoding="utf-8")
    return out


def _ensure_curves(record: RunRecord) -> Path | None:
    curves = record.path / CURVES_FILE
    metrics_file = record.path / "metrics.jsonl"
    if curves.is_file():
        stale = metrics_file.is_file() and curves.stat().st_mtime < metrics_file.stat().st_mtime
        if not stale:
            return curves
    return write_curves(record)


def _title_section(record: RunRecord) -> str:
    title = f"# {record.recipe or 'llmlab run'}" + (f" · {record.preset}" if record.preset else "")
    stop = _result(record, "stop_reason")
    stop_text = f" (stopped: {stop})" if stop else ""
    return f"{title}\n\nRun `{record.name}` — status: **{_status_text(record)}**{stop_text}"


def _summary_section(record: RunRecord) -> str:
    r = record.result or {}
    hardware = r.get("hardware") if isinstance(r.get("hardware"), dict) else {}
    device = fmt_text(r.get("device"))
    if r.get("device") == "cuda" and hardware.get("gpu"):
        device = f"cuda ({hardware['gpu']})"
    n_params = r.get("n_params")
    params = f"{fmt_count(n_params)} ({fmt_params(n_params)})" if is_number(n_params) else DASH
    seed = r.get("seed", record.resolved_config.get("seed"))
    sentences = [
        f"This run trained the `{record.recipe or DASH}` recipe (preset `{record.preset or DASH}`)"
        + (f" on {r['data']}." if r.get("data") else "."),
    ]
    if is_number(n_params):
        sentences.append(f"The model has {params} parameters.")
    if _steps(record) is None:
        sentences.append("No training step has been logged yet.")
    else:
        steps, epochs = fmt_count(_steps(record)), fmt_epochs(_epochs(record))
        training = f"Training ran for {steps} steps ({epochs} epochs)"
        training += f" on {device}" if r.get("device") else ""
        training += f" with world size {r['world_size']}" if r.get("world_size") else ""
        training += f" in {r['precision']} precision" if r.get("precision") else ""
        training += f", seed {seed}" if seed is not None else ""
        wall = r.get("wall_time_s")
        training += f", and took {fmt_duration(wall)} wall time." if is_finite_number(wall) else "."
        sentences.append(training)
    best_step = record.final_metrics().get("best/step")
    selected_on = record.flat_config().get("train.best_metric")
    if is_number(best_step) and isinstance(selected_on, str):  # train.best_metric (llmlab/train/best.py)
        best_epoch = record.final_metrics().get("best/epoch")
        where = f" (epoch {fmt_epochs(best_epoch)})" if is_number(best_epoch) else ""
        sentences.append(
            f"The final model is that of step {fmt_count(best_step)}{where}, the best `{selected_on}` of the "
            "run's evaluations (`train.best_metric`); the test split was evaluated on it."
        )
    averaged, kind = record.final_metrics().get("average/n"), record.flat_config().get("train.weight_average")
    if is_number(averaged) and kind in ("ema", "swa"):  # train.weight_average (llmlab/train/averaging.py)
        first = record.final_metrics().get("average/first_step")
        what = {"ema": "an exponential moving average", "swa": "the mean"}[kind]
        since = f" from step {fmt_count(first)} on" if is_number(first) else ""
        sentences.append(
            f"The final model is {what} of the weights of {fmt_count(averaged)} steps{since} "
            "(`train.weight_average`); the validation and test splits were evaluated on it."
        )
    return f"## Summary\n\n{' '.join(sentences)}\n\n**Result:** {headline(record)}"


def _results_section(record: RunRecord) -> str:
    metrics = _report_metrics(record)
    if not metrics:
        return "## Results\n\n_No metrics recorded yet._"
    v = verdict(record)
    rows = []
    for name, value in metrics.items():
        target = f"{v.bound} {MET[v.met]}" if name == v.metric and v.value is not None else ""
        rows.append([f"`{name}`", fmt_metric(name, value), target])
    if v.metric and v.metric not in metrics and v.value is not None:
        rows.append([f"`{v.metric}`", DASH, f"{v.bound} {MET[v.met]}"])
    source = "" if record.result is not None else "\n\n_Last logged values (metrics.jsonl; no result.json)._"
    return "## Results\n\n" + md_table(["metric", "value", "target"], rows) + source


def _recipe_sections(record: RunRecord) -> list[str]:
    """Sections a recipe wrote for its runs (`sections/*.md` in the run directory, in name order), e.g. a
    translation run's BLEU table, sample translations and attention heat-map."""
    folder = record.path / SECTIONS_DIR
    if not folder.is_dir():
        return []
    return [p.read_text(encoding="utf-8", errors="replace").strip() for p in sorted(folder.glob("*.md"))]


def _curves_section(record: RunRecord, curves: Path | None) -> str:
    body = f"![curves]({CURVES_FILE})" if curves is not None else "_No metrics logged yet._"
    if (record.path / "tb").is_dir():
        body += f"\n\nTensorBoard: `tensorboard --logdir {record.path / 'tb'}`"
    return f"## Curves\n\n{body}"


def _performance_section(record: RunRecord) -> str:
    r = record.result or {}
    kind = {"cuda_max_allocated": "CUDA max allocated", "cpu_max_rss": "CPU max RSS"}.get(
        r.get("peak_memory_kind"), fmt_text(r.get("peak_memory_kind"))
    )
    rows = [
        ["throughput", fmt_throughput(r.get("throughput"))],
        [
            "peak memory",
            f"{fmt_memory(r.get('peak_memory_mb'))} ({kind})" if is_number(r.get("peak_memory_mb")) else DASH,
        ],
        ["wall time", fmt_duration(r.get("wall_time_s"))],
        ["train time", fmt_duration(r.get("train_time_s"))],
        ["steps", fmt_count(_steps(record))],
        ["epochs", fmt_epochs(_epochs(record))],
        ["parameters", fmt_count(r.get("n_params"))],
    ]
    return "## Performance\n\n" + md_table(["quantity", "value"], rows)


def _config_section(record: RunRecord) -> str:
    overrides = record.config.get("overrides") or []
    override_text = ", ".join(f"`{o}`" for o in overrides) if overrides else "none (preset defaults)"
    lines = [
        "## Configuration",
        f"Recipe `{record.recipe or DASH}`, preset `{record.preset or DASH}`; overrides: {override_text}.",
    ]
    flat = record.flat_config()
    if flat:
        rows = [[f"`{k}`", f"`{fmt_config_value(v)}`"] for k, v in flat.items()]
        lines.append(md_table(["key", "value"], rows, align_numbers=False))
    else:
        lines.append("_No resolved config recorded._")
    return "\n\n".join(lines)


def _environment_section(record: RunRecord) -> str:
    r = record.result or {}
    hw = r.get("hardware") if isinstance(r.get("hardware"), dict) else {}
    cpu_count = f" ({hw['cpu_count']} cores)" if hw.get("cpu_count") else ""
    gpu_count = f" × {hw['gpu_count']}" if hw.get("gpu") and hw.get("gpu_count") else ""
    rows = [
        ["device", fmt_text(r.get("device"))],
        ["precision", fmt_text(r.get("precision"))],
        ["world size", fmt_text(r.get("world_size"))],
        ["platform", fmt_text(hw.get("platform"))],
        ["CPU", fmt_text(hw.get("cpu")) + cpu_count],
        ["GPU", fmt_text(hw.get("gpu")) + gpu_count],
    ]
    versions = r.get("versions") if isinstance(r.get("versions"), dict) else {}
    if not versions and record.config.get("llmlab_version"):
        versions = {"llmlab": record.config["llmlab_version"]}
    rows += [[name, fmt_text(version)] for name, version in versions.items()]
    rows += [
        ["git commit", f"`{r['git_commit']}`" if r.get("git_commit") else DASH],
        ["started", fmt_text(r.get("started_at"))],
        ["finished", fmt_text(r.get("finished_at"))],
    ]
    return "## Environment\n\n" + md_table(["item", "value"], rows, align_numbers=False)


def _notes_section(record: RunRecord) -> str:
    notes = []
    if record.result is None:
        notes.append("No result.json: the run is still going or was killed; figures come from metrics.jsonl.")
    elif record.status not in (None, "completed"):
        notes.append(f"The run ended with status **{record.status}**: its figures are not a finished result.")
    notes += [str(n) for n in (_result(record, "notes") or []) if n]
    if not notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {n}" for n in notes)


# ---------------------------------------------------------------------------------------------------------
# Several runs: comparison table
# ---------------------------------------------------------------------------------------------------------


def compare_runs(runs: Sequence[RunRecord | str | Path]) -> str:
    """One markdown table, a row per run, with a column for every config key whose value differs."""
    records = _load_all(runs)
    target_metric = _shared_target_metric(records)
    metrics = _metric_columns(records, exclude=target_metric)
    flats = [r.flat_config() for r in records]
    differing = differing_keys(flats)

    headers = ["run", "recipe", "preset", "status"]
    headers += [f"{target_metric} (target)", "met"] if target_metric else ["target", "met"]
    headers += metrics + ["steps", "wall time", "time/epoch", "throughput", "peak memory", "params"]
    headers += differing

    best = _best_target_value(records, target_metric)
    rows = []
    for label, record, flat in zip(_run_labels(records), records, flats, strict=True):
        v = verdict(record)
        final = record.final_metrics()
        if target_metric:
            target_cell = fmt_metric(target_metric, v.achieved)
            if best is not None and v.achieved == best:
                target_cell = f"**{target_cell}**"
        else:
            target_cell = f"{v.metric} {fmt_metric(v.metric, v.achieved)}" if v.metric else DASH
        r = record.result or {}
        rows.append(
            [
                label,
                fmt_text(record.recipe),
                fmt_text(record.preset),
                record.status or "running/killed",
                target_cell,
                MET[v.met],
            ]
            + [fmt_metric(m, final.get(m)) for m in metrics]
            + [
                fmt_count(_steps(record)),
                fmt_duration(r.get("wall_time_s")),
                fmt_duration(_time_per_epoch(record)),
                fmt_throughput(r.get("throughput")),
                fmt_memory(r.get("peak_memory_mb")),
                fmt_params(r.get("n_params")),
            ]
            + [fmt_config_value(flat[k]) if k in flat else DASH for k in differing]
        )
    return md_table(headers, rows)


def _time_per_epoch(record: RunRecord) -> float | None:
    """Training time (not evaluation, not start-up) per epoch of training data."""
    train_time, epochs = _result(record, "train_time_s"), _epochs(record)
    if not (is_finite_number(train_time) and is_finite_number(epochs)) or epochs <= 0:
        return None
    return train_time / epochs


def differing_keys(flats: Sequence[dict[str, Any]]) -> list[str]:
    """Dotted keys whose value differs between runs (missing counts as different), first-seen order."""
    keys: dict[str, None] = {}
    for flat in flats:
        keys.update(dict.fromkeys(flat))
    return [k for k in keys if len({_identity(flat.get(k, _Missing)) for flat in flats}) > 1]


class _Missing:
    """Sentinel for a key absent from a run's config."""


def _identity(value: Any) -> str:
    """A hashable spelling of a config value, so lists and dicts can be compared and grouped."""
    if value is _Missing:
        return "<missing>"
    return json.dumps(value, sort_keys=True)


def _load_all(runs: Sequence[RunRecord | str | Path]) -> list[RunRecord]:
    if not runs:
        raise ValueError("need at least one run")
    return [as_run(r) for r in runs]


def _run_labels(records: list[RunRecord]) -> list[str]:
    """Folder names; parent/folder where two runs share a folder name."""
    names = [r.name for r in records]
    return [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in records]


def _shared_target_metric(records: list[RunRecord]) -> str | None:
    """The target metric when every run with a target names the same one; else None (mixed or absent)."""
    names = {verdict(r).metric for r in records} - {None}
    return names.pop() if len(names) == 1 else None


def _metric_columns(records: list[RunRecord], exclude: str | None = None) -> list[str]:
    names: set[str] = set()
    for r in records:
        names.update(r.final_metrics())
    names.discard(exclude)
    return sorted(names, key=metric_sort_key)


def _best_target_value(records: list[RunRecord], metric: str | None) -> float | None:
    if metric is None or len(records) < 2:
        return None
    verdicts = [verdict(r) for r in records]
    values = [v.achieved for v in verdicts if is_finite_number(v.achieved)]
    if not values:
        return None
    higher = all(v.higher_is_better for v in verdicts)
    return max(values) if higher else min(values)


# ---------------------------------------------------------------------------------------------------------
# Several runs: mean ± std over seeds
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MetricStats:
    """Sample statistics of one metric over a group's finite values (std uses n - 1; None when n < 2)."""

    mean: float
    std: float | None
    n: int


@dataclass
class GroupStats:
    """Runs sharing the same values of the grouping keys."""

    key: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)
    metrics: dict[str, MetricStats] = field(default_factory=dict)
    met: int = 0
    evaluated: int = 0


def aggregate_metrics(
    runs: Sequence[RunRecord | str | Path], group_by: list[str] | None = None
) -> list[GroupStats]:
    """Group runs and compute mean ± std per final metric.

    group_by: dotted config keys (or "recipe"/"preset"); by default every key whose value differs between
    runs, except seeds (any key named `seed`), plus recipe and preset when they differ. Groups come sorted by
    their key values.
    """
    records = _load_all(runs)
    flats = [_group_view(r) for r in records]
    keys = _default_group_keys(flats) if group_by is None else _check_group_keys(group_by, flats)

    groups: dict[tuple[str, ...], GroupStats] = {}
    for record, flat in zip(records, flats, strict=True):
        identity = tuple(_identity(flat.get(k, _Missing)) for k in keys)
        group = groups.setdefault(identity, GroupStats(key={k: flat.get(k) for k in keys}))
        group.runs.append(record)

    names = _metric_columns(records)
    for group in groups.values():
        group.metrics = _group_metric_stats(group.runs, names)
        verdicts = [verdict(r).met for r in group.runs]
        group.met = sum(m is True for m in verdicts)
        group.evaluated = sum(m is not None for m in verdicts)
    return [groups[k] for k in sorted(groups, key=lambda k: _group_sort_key(groups[k], keys))]


def aggregate_runs(runs: Sequence[RunRecord | str | Path], group_by: list[str] | None = None) -> str:
    """A markdown table, a row per group: key values, run count, seeds, target met, metric mean ± std (n)."""
    groups = aggregate_metrics(runs, group_by)
    keys = list(groups[0].key)
    records = [r for g in groups for r in g.runs]
    target_metric = _shared_target_metric(records)
    names = _metric_columns(records)
    if target_metric in names:
        names.remove(target_metric)
        names.insert(0, target_metric)

    headers = ["recipe", "preset"] + [k for k in keys if k not in SPECIAL_GROUP_KEYS]
    headers += ["runs", "seeds", "target met"] + names + ["throughput", "peak memory"]
    rows = []
    for g in groups:
        row = [_distinct(g.runs, "recipe"), _distinct(g.runs, "preset")]
        row += [
            fmt_config_value(g.key[k]) if g.key[k] is not None else DASH
            for k in keys
            if k not in SPECIAL_GROUP_KEYS
        ]
        seeds = [r.flat_config().get("seed") for r in g.runs]
        row += [
            str(len(g.runs)),
            ", ".join(fmt_text(s) for s in seeds),
            f"{g.met}/{g.evaluated}" if g.evaluated else DASH,
        ]
        row += [fmt_mean_std(n, g.metrics.get(n)) for n in names]
        peak = _mean_of((r.result or {}).get("peak_memory_mb") for r in g.runs)
        row += [_mean_throughput(g.runs), fmt_memory(peak)]
        rows.append(row)
    caption = (
        "_mean ± sample std (n - 1 denominator) over the runs of each group; (n) counts finite values; "
        "throughput (training) and peak memory (process) are means over the runs._"
    )
    return md_table(headers, rows) + "\n\n" + caption


def _mean_of(values: Any) -> float | None:
    finite = [float(v) for v in values if is_finite_number(v)]
    return statistics.fmean(finite) if finite else None


def _mean_throughput(runs: list[RunRecord]) -> str:
    """The mean of the runs' result.json throughput ({"value", "unit"} or a number), formatted."""
    items = [(r.result or {}).get("throughput") for r in runs]
    values = [t.get("value") if isinstance(t, dict) else t for t in items]
    units = {t.get("unit") for t in items if isinstance(t, dict)}
    mean = _mean_of(values)
    if mean is None:
        return DASH
    return fmt_throughput({"value": mean, "unit": units.pop()} if len(units) == 1 else mean)


def fmt_mean_std(name: str, stats: MetricStats | None) -> str:
    """E.g. "98.42 ± 0.12% (n=3)" for accuracy, "0.0532 ± 0.0012 (n=3)" otherwise, "0.0532 (n=1)" alone."""
    if stats is None or stats.n == 0:
        return DASH
    if is_fraction_metric(name, [stats.mean]):
        if stats.std is None:
            return f"{stats.mean:.2%} (n={stats.n})"
        return f"{stats.mean * 100:.2f} ± {stats.std * 100:.2f}% (n={stats.n})"
    if stats.std is None:
        return f"{fmt_float(stats.mean)} (n={stats.n})"
    return f"{fmt_float(stats.mean)} ± {stats.std:.2g} (n={stats.n})"


def _group_view(record: RunRecord) -> dict[str, Any]:
    """Flattened config plus recipe and preset, the keys a group can be made of."""
    view = {"recipe": record.recipe, "preset": record.preset}
    view.update(record.flat_config())
    return view


def _is_seed_key(key: str) -> bool:
    return key.rpartition(".")[2] == "seed"


def _default_group_keys(flats: list[dict[str, Any]]) -> list[str]:
    return [k for k in differing_keys(flats) if not _is_seed_key(k)]


def _check_group_keys(group_by: list[str], flats: list[dict[str, Any]]) -> list[str]:
    known: dict[str, None] = {}
    for flat in flats:
        known.update(dict.fromkeys(flat))
    for key in group_by:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"cannot group by {key!r}: no run has that config key{hint}")
    return list(group_by)


def _group_metric_stats(runs: list[RunRecord], names: list[str]) -> dict[str, MetricStats]:
    stats = {}
    for name in names:
        values = [float(v) for r in runs if is_finite_number(v := r.final_metrics().get(name))]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else None
            stats[name] = MetricStats(mean=statistics.fmean(values), std=std, n=len(values))
    return stats


def _group_sort_key(group: GroupStats, keys: list[str]) -> tuple:
    """Numbers before strings before missing, so a sweep reads in ascending order."""
    parts = []
    for k in keys:
        value = group.key.get(k)
        if is_number(value):
            parts.append((0, float(value), ""))
        elif value is None:
            parts.append((2, 0.0, ""))
        else:
            parts.append((1, 0.0, fmt_config_value(value)))
    return tuple(parts)


def _distinct(runs: list[RunRecord], attribute: str) -> str:
    values = list(dict.fromkeys(getattr(r, attribute) or DASH for r in runs))
    return ", ".join(values)
