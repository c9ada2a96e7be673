"""Loading a run directory written by the trainer: config.json, metrics.jsonl and result.json.

The loader only reads. It is forgiving where a run can legitimately be incomplete (no result.json while the
run is still going or after a kill; a truncated last metrics line) and strict where the folder is not a run
at all (no config.json, corrupt JSON), raising `RunDirError` with the file named.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.config import flatten

# Keys of a metrics.jsonl line that are bookkeeping, not measured quantities.
LINE_KEYS = ("step", "epoch", "split", "time_s")
# Train-line keys that describe the optimizer or the machine rather than the model's quality.
TRAIN_ONLY_KEYS = ("lr", "throughput")
SPLIT_ORDER = ("train", "val", "test")


class RunDirError(FileNotFoundError):
    """The folder is missing, is not an llmlab run directory, or holds a corrupt record file."""


@dataclass
class RunRecord:
    """Everything a report needs from one run directory."""

    path: Path
    config: dict[str, Any]
    result: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def recipe(self) -> str | None:
        return _first_str(self.config.get("recipe"), (self.result or {}).get("recipe"))

    @property
    def preset(self) -> str | None:
        return _first_str(self.config.get("preset"), (self.result or {}).get("preset"))

    @property
    def status(self) -> str | None:
        """The trainer's verdict, or None when there is no result.json (running or killed)."""
        if self.result is None:
            return None
        status = self.result.get("status")
        return status if isinstance(status, str) else None

    @property
    def resolved_config(self) -> dict[str, Any]:
        resolved = self.config.get("config")
        return resolved if isinstance(resolved, dict) else {}

    def flat_config(self) -> dict[str, Any]:
        """The resolved config as dotted keys, e.g. {"optim.lr": 0.001, "seed": 0}."""
        return flatten(self.resolved_config)

    def final_metrics(self) -> dict[str, float]:
        """Final metrics as "split/name" → value: result.json's, or the last logged ones when it is absent."""
        if self.result is not None and isinstance(self.result.get("metrics"), dict):
            return {k: v for k, v in self.result["metrics"].items() if is_number(v)}
        return last_logged_metrics(self.metrics)

    def target(self) -> dict[str, Any]:
        """result.json's target block ({} when absent)."""
        target = (self.result or {}).get("target")
        return target if isinstance(target, dict) else {}


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a run directory; raise RunDirError when it is not one or a record file is corrupt."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path} is not an llmlab run directory: the folder does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise RunDirError(f"{path} is not an llmlab run directory: config.json missing")
    config = _read_json_object(config_path)
    result_path = path / "result.json"
    result = _read_json_object(result_path) if result_path.is_file() else None
    metrics = read_metrics(path / "metrics.jsonl")
    return RunRecord(path=path, config=config, result=result, metrics=metrics)


def as_run(run: RunRecord | str | Path) -> RunRecord:
    """Accept either a loaded record or a path to one."""
    return run if isinstance(run, RunRecord) else load_run(run)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl, skipping (with a warning) lines that are not complete metric records."""
    if not path.is_file():
        return []
    lines: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            record, problem = _parse_metrics_line(text)
            if record is None:
                warnings.warn(f"{path}:{lineno}: skipping malformed metrics line ({problem})", stacklevel=2)
                continue
            lines.append(record)
    return lines


def _parse_metrics_line(text: str) -> tuple[dict[str, Any] | None, str]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg}"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not is_number(record.get("step")):
        return None, "no numeric 'step'"
    if not isinstance(record.get("split"), str):
        return None, "no 'split'"
    return record, ""


def metric_names(lines: list[dict[str, Any]]) -> list[str]:
    """Quality metrics logged anywhere (not step/epoch/time, not lr/throughput), in first-seen order."""
    names: dict[str, None] = {}
    for line in lines:
        for key, value in line.items():
            if key in LINE_KEYS or key in TRAIN_ONLY_KEYS or not is_number(value):
                continue
            names.setdefault(key, None)
    return list(names)


def series(lines: list[dict[str, Any]], split: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric on one split, sorted by step; a repeated step keeps its last value."""
    by_step: dict[float, float] = {}
    for line in lines:
        if line.get("split") == split and is_number(line.get(key)):
            by_step[line["step"]] = float(line[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def last_logged_metrics(lines: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each quality metric per split, keyed "split/name" like result.json."""
    last: dict[str, float] = {}
    for line in lines:
        for key, value in line.items():
            if key in LINE_KEYS or key in TRAIN_ONLY_KEYS or not is_number(value):
                continue
            last[f"{line['split']}/{key}"] = float(value)
    return dict(sorted(last.items(), key=lambda kv: metric_sort_key(kv[0])))


def metric_sort_key(name: str) -> tuple[int, bool, str]:
    """Order "split/name" keys: val, test, train, others; loss first within a split; then alphabetical."""
    split, _, metric = name.rpartition("/")
    rank = {"val": 0, "test": 1, "train": 2}.get(split, 3)
    return rank, metric != "loss", name


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is corrupt: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is corrupt: expected a JSON object, got {type(data).__name__}")
    return data


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _first_str(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value:
            return value
    return None


# Metric-name tokens whose values in [0, 1] are fractions best shown as percentages.
FRACTION_TOKENS = frozenset({"acc", "accuracy", "f1", "precision", "recall", "top1", "top5", "exact"})


def is_fraction_metric(name: str, values: list[float] | tuple[float, ...] = ()) -> bool:
    """True for accuracy-like metrics (by name) whose known values all lie in [0, 1]."""
    metric = name.rpartition("/")[2].lower()
    tokens = set(metric.replace("-", "_").split("_"))
    if not tokens & FRACTION_TOKENS:
        return False
    return all(0.0 <= v <= 1.0 for v in values if is_finite_number(v))
