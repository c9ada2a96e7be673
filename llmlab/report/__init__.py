"""Run reports: load a run directory, draw its curves, write report.md, and compare or aggregate runs."""

from llmlab.report.curves import write_curves
from llmlab.report.markdown import aggregate_metrics, aggregate_runs, compare_runs, write_report
from llmlab.report.run import RunDirError, RunRecord, load_run

__all__ = [
    "RunDirError",
    "RunRecord",
    "aggregate_metrics",
    "aggregate_runs",
    "compare_runs",
    "load_run",
    "write_curves",
    "write_report",
]
