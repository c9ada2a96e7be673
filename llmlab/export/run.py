"""One run being exported (`RunExport`): what an exporter reads (the run) and fills in (the files it
wrote, how to load them) for the model card; below the exporters, the card and core.py (which picks the
exporter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.report import RunDirError
from llmlab.train.checkpoint import CheckpointError

EXPORT_MANIFEST = "llmlab_export.json"  # marks a folder as an llmlab export (what --force may replace)
RECORD_DIR = "llmlab_run"  # the run record, for provenance: config.json, result.json, metrics.jsonl, ...


@dataclass
class RunExport:
    """One run being exported: what the recipe's `export` hook reads (the run) and fills in (what it wrote,
    how to load it), for the model card."""

    run_dir: Path
    recipe: Any  # llmlab.recipes.base.Recipe
    cfg: Any  # the run's config dataclass
    stored: dict[str, Any]  # config.json as written by the runner (recipe, preset, overrides, config)
    result: dict[str, Any]  # result.json
    ref: str  # how the card's code names the model: the Hub repo id, else the export folder
    title: str  # the card's model name: the Hub repo id, else the export folder's name
    repo_id: str | None = None  # --push-to-hub
    base_model: str | None = None  # --base-model: the Hub id of the model an adapter is applied to
    merged: bool = False  # --merged: adapters also as one merged model
    # filled in by the hook
    kind: str = "llmlab"  # a word for the manifest: llmlab | transformers | peft
    library: str = "llmlab"  # the card's library_name
    task: str | None = None  # the card's pipeline tag / model-index task, e.g. "text-generation"
    architecture: str = ""  # one line for the card
    tags: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # path in the folder -> what it is
    usage: str = ""  # markdown: how to load it
    base: str | None = None  # the card's base_model (a Hub id), when the model derives from one
    limitations: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.stored["recipe"]

    @property
    def init(self) -> dict[str, Any] | None:
        """init.json of a fine-tune (where it started), or None."""
        path = self.run_dir / "init.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunDirError(f"{path} is corrupt: {err}") from err

    def final_file(self, relative: str, what: str = "final weights") -> Path:
        """A file or folder of the run's final model; a CheckpointError naming it when it is missing."""
        path = self.run_dir / relative
        if not path.exists():
            raise CheckpointError(
                f"{self.run_dir} has no {what} ({path} is missing) although result.json says it completed: "
                "the run directory is incomplete; re-run it"
            )
        return path


def load_fitting(model: Any, weights: dict[str, Any], where: Path) -> None:
    """Load `weights` into `model` strictly; a CheckpointError naming a few missing, unexpected or
    mis-shaped tensors when they are another model's."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    shapes = [
        f"{k} {tuple(weights[k].shape)} (the model's {tuple(own[k].shape)})"
        for k in sorted(own.keys() & weights.keys())
        if own[k].shape != weights[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
            for what, v in (("missing", missing), ("unexpected", unexpected), ("of other shapes", shapes))
            if v
        ]
        raise CheckpointError(
            f"{where}: the weights do not fit the run's model config: tensors {'; '.join(parts)}. Are they "
            "this run's?"
        )
    model.load_state_dict(weights)
