"""What a recipe is: a typed config with named presets, a target, and how to build model, data and loss.

The runner (llmlab/runner.py) turns a recipe + preset + overrides into a run directory: it builds the
Experiment, hands it to the one Trainer, and writes the run record and report.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from llmlab.config import ConfigError
from llmlab.train.callbacks import Callback
from llmlab.train.distributed import DistEnv


@dataclass(frozen=True)
class Target:
    """The figure a preset is meant to reach, e.g. test/accuracy >= 0.98."""

    metric: str
    value: float
    higher_is_better: bool = True

    def met(self, achieved: float | None) -> bool | None:
        if achieved is None:
            return None
        return achieved >= self.value if self.higher_is_better else achieved <= self.value

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.value:g}"


@dataclass
class BuildContext:
    """Where and how the experiment will run."""

    device: torch.device
    dist: DistEnv = field(default_factory=DistEnv)
    data_dir: Path | None = None  # --data-dir; None: LLMLAB_DATA or ~/.cache/llmlab
    # The directory of an existing run (resuming, `llmlab eval`; None for a new run): a recipe reuses the
    # artifacts it holds (e.g. its tokenizer.json) instead of rebuilding them, so it sees the same ones.
    run_dir: Path | None = None


@dataclass
class FinalEvaluation:
    """What a recipe's end-of-run evaluation adds to the run record (see `Experiment.final_eval`)."""

    metrics: dict[str, float]  # "split/name", e.g. "test/bleu_beam"
    notes: list[str] = field(default_factory=list)  # into result.json's notes and the report
    info: dict[str, str] = field(default_factory=dict)  # non-numeric facts, e.g. {"bleu_signature": ...}


@dataclass
class Experiment:
    """Everything the Trainer needs, built by a recipe from its config."""

    model: nn.Module
    task: Any
    optimizer: torch.optim.Optimizer
    train_loader: Any
    eval_loaders: dict[str, Iterable]  # evaluated during training, for model selection ("val")
    final_loaders: dict[str, Iterable]  # evaluated once at the end ("test")
    data_description: str
    notes: list[str] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    # Files the run directory should hold besides the record, e.g. {"vocab.json": vocab.to_json}: each
    # writer is called with the file's path once, when the run starts.
    artifacts: dict[str, Callable[[Path], Any]] = field(default_factory=dict)
    # Evaluation that needs more than additive batch statistics (decoding whole splits with several search
    # settings, corpus BLEU): `final_eval(model, splits, run_dir)` runs on the main process once training is
    # complete, and for `llmlab eval` (run_dir None: write nothing). It may write files into run_dir (e.g.
    # translations, figures, a report section under sections/).
    final_eval: Callable[[nn.Module, list[str], Path | None], FinalEvaluation] | None = None
    # How the final model is written into the run directory, and read back by `llmlab eval`; None: the
    # Trainer's weights as RUN_DIR/model.safetensors. E.g. a Hugging Face model directory, RUN_DIR/model/.
    save_model: Callable[[nn.Module, Path], None] | None = None
    load_model: Callable[[nn.Module, Path], None] | None = None
    # The processes as the Trainer sees them, when the model is split over some of them (tensor parallelism:
    # the data-parallel replicas, llmlab/parallel/layout.py); None: every process is a replica.
    dist: DistEnv | None = None


@dataclass
class Outcome:
    """What a finished (or stopped) training loop reports to the runner, which writes the run record."""

    status: str  # completed | diverged | interrupted
    metrics: dict[str, float]  # final metrics, "split/name"
    steps: int
    epochs: float
    train_time_s: float
    units_seen: int
    unit: str  # "samples" or "tokens"
    n_params: int
    precision: str
    save: Callable[[Path], None]  # writes the final model into the run directory
    stop_reason: str | None = None
    error: str | None = None


class Recipe:
    """Subclasses set the class attributes and implement `build`. Configs have `seed`, `train` (TrainConfig)
    and `schedule` (ScheduleConfig) fields, plus whatever the model and data need."""

    name: ClassVar[str]
    description: ClassVar[str]
    dataset: ClassVar[str]
    config_cls: ClassVar[type]
    presets: ClassVar[dict[str, Callable[[], Any]]]
    preset_help: ClassVar[dict[str, str]] = {}
    targets: ClassVar[dict[str, Target]] = {}  # per preset; presets without one claim no target
    default_preset: ClassVar[str] = "default"
    # True when even the smoke preset reads files from the data root (e.g. a real tokenizer vocabulary): the
    # test suite then runs it only where the data is present.
    smoke_needs_data: ClassVar[bool] = False
    # What `train.batch_size` may count: samples, or tokens for recipes that batch by length (translation).
    batch_units: ClassVar[tuple[str, ...]] = ("samples",)

    def config(self, preset: str | None = None) -> Any:
        preset = preset or self.default_preset
        if preset not in self.presets:
            close = difflib.get_close_matches(preset, list(self.presets), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"recipe {self.name!r} has no preset {preset!r} (presets: {', '.join(self.presets)}).{hint}"
            )
        return self.presets[preset]()

    def target(self, preset: str) -> Target | None:
        return self.targets.get(preset)

    def eval_config(self, cfg: Any) -> Any:
        """The config `llmlab eval` rebuilds a finished run with, on one process (e.g. a tensor-parallel run's
        whole weights evaluated without splitting the model)."""
        return cfg

    def check_launch(self, cfg: Any, world_size: int) -> None:
        """Refuse (ConfigError) a config this many processes cannot run, before any process group exists."""

    def build(self, cfg: Any, ctx: BuildContext) -> Experiment:
        raise NotImplementedError


def load_run_of_kind(run_dir: Path | str, recipe_cls: type, kind: str) -> tuple[Path, Any, Any]:
    """(run_dir, recipe, config) of a run whose recipe is a `recipe_cls` (e.g. a translation model); anything
    else is a RunDirError naming what it is. The recipe is found among `recipe_cls`'s subclasses by the name
    config.json stores, so a recipe that reads another run needs no registry (imports point down)."""
    import json

    from llmlab.config import from_dict
    from llmlab.report import RunDirError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    path = run_dir / "config.json"
    if not path.exists():
        raise RunDirError(f"{run_dir} is not an llmlab run directory: config.json missing")
    try:
        stored = json.loads(path.read_text())
        name = stored["recipe"]
        classes, todo = {}, [recipe_cls]
        while todo:
            cls = todo.pop()
            if isinstance(getattr(cls, "name", None), str):
                classes.setdefault(cls.name, cls)
            todo.extend(cls.__subclasses__())
        if name not in classes:
            raise RunDirError(f"{run_dir} is a run of {name}, not {kind}")
        recipe = classes[name]()
        return run_dir, recipe, from_dict(recipe.config_cls, stored["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunDirError(f"{path} is corrupt: {err}") from err
