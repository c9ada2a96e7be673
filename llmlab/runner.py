"""Run a recipe: resolve its config, build it, train it with the one Trainer, write the run record.

A run directory holds config.json (fully resolved), metrics.jsonl, tb/ (TensorBoard), checkpoints/,
model.safetensors (final weights), result.json, curves.png and report.md. Nothing is written until the
config is valid and the data is found, and an existing run is never overwritten: it is resumed
(`--resume`) or left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

import llmlab
from llmlab.config import ConfigError, apply_overrides, flatten, from_dict, to_dict
from llmlab.recipes import BuildContext, get_recipe
from llmlab.recipes.base import Experiment, Outcome, load_run_of_kind  # noqa: F401 — re-exported
from llmlab.report import RunDirError
from llmlab.train.callbacks import Callback, MetricsFile, ProgressBar, TensorBoard
from llmlab.train.checkpoint import (  # noqa: F401 — load_run_weights re-exported
    CheckpointError,
    latest_checkpoint,
    load_run_weights,
    load_weights,
    save_weights,
)
from llmlab.train.distributed import (
    DistEnv,
    ProcessGroupError,
    describe_failure,
    init_distributed,
    is_process_group_failure,
    local_rank_from_env,
    resolve_device,
)
from llmlab.train.record import git_commit, hardware_info, now_iso, peak_memory, versions, write_json
from llmlab.train.rng import seed_everything, set_deterministic
from llmlab.train.strategy import check_config
from llmlab.train.trainer import NonFiniteLossError, Trainer, evaluate, resolve_precision


class RunConflictError(ConfigError):
    """The output directory conflicts with the request (exists without --resume, or mismatching config)."""


def default_out_dir(recipe: str, preset: str) -> Path:
    return Path("runs") / f"{recipe}-{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resolve_config(recipe_name: str, preset: str | None, overrides: Sequence[str]) -> tuple[Any, Any, str]:
    recipe = get_recipe(recipe_name)
    preset = preset or recipe.default_preset
    cfg = apply_overrides(recipe.config(preset), list(overrides))
    unit = getattr(getattr(cfg, "train", None), "batch_unit", "samples")
    if unit not in recipe.batch_units:
        raise ConfigError(
            f"train.batch_unit={unit}: recipe {recipe.name!r} batches by {' or '.join(recipe.batch_units)}"
        )
    return recipe, cfg, preset


# How the work is spread, not what is computed: a checkpoint holds the full state in one format for every
# engine, so a run may continue under another one (and on another number of processes).
# How the work is spread, not what is computed: a run may resume under other values (its checkpoints hold
# whole weights and optimizer states). parallel.*: gpt-tp's tensor-parallel size, engine and timing.
ENGINE_KEYS = frozenset(
    {"train.strategy", "train.ds_stage", "train.offload", "train.activation_checkpointing", "parallel.tp",
     "parallel.engine", "parallel.time_comm", "train.dist_timeout_s"}
)  # fmt: skip


def _check_resume(out: Path, recipe: Any, preset: str, cfg: Any) -> None:
    recipe_name = recipe.name
    stored_path = out / "config.json"
    if not stored_path.exists():
        raise RunConflictError(f"--resume: {out} is not a run directory (no config.json); nothing to resume")
    stored = json.loads(stored_path.read_text())
    if (stored.get("recipe"), stored.get("preset")) != (recipe_name, preset):
        raise RunConflictError(
            f"--resume: {out} is a run of {stored.get('recipe')} --preset {stored.get('preset')}, "
            f"not {recipe_name} --preset {preset}"
        )
    # A setting added to llmlab after the run was written is absent from its config.json: the run behaved as
    # the preset's default does, so only an override that moves it from that default changes the run.
    default = flatten(to_dict(recipe.config(preset)))
    old, new = flatten(stored["config"]), flatten(to_dict(cfg))
    old = {**{k: default[k] for k in new.keys() - old.keys() if k in default}, **old}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ENGINE_KEYS)
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise RunConflictError(
            f"--resume continues a run with its own config; these overrides change it: {changes}"
        )


def _record_engine_change(out: Path, cfg: Any) -> None:
    """A resumed run continued under another engine: config.json says what it finishes under, and keeps
    what it started under (`resumed_from_engine`)."""
    stored = json.loads((out / "config.json").read_text())
    old, new = flatten(stored["config"]), flatten(to_dict(cfg))
    changed = {k: old.get(k) for k in ENGINE_KEYS if k in new and old.get(k) != new[k]}
    if not changed:
        return
    stored.setdefault("resumed_from_engine", []).append(changed)
    for key in changed:
        group, name = key.split(".", 1)
        stored["config"][group][name] = new[key]
    write_json(out / "config.json", stored)


def run(
    recipe_name: str,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    out: Path | str | None = None,
    resume: bool = False,
    device: str = "auto",
    data_dir: Path | str | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train `recipe_name` and return its result.json content."""
    started, t0 = now_iso(), time.perf_counter()
    recipe, cfg, preset = resolve_config(recipe_name, preset, overrides)  # ConfigError: nothing written
    out = Path(out) if out is not None else default_out_dir(recipe.name, preset)
    if resume:
        _check_resume(out, recipe, preset, cfg)
    elif (out / "config.json").exists():
        raise RunConflictError(
            f"{out} already holds a run; continue it with --resume or choose another --out"
        )

    recipe.check_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group work
    dev = resolve_device(device, local_rank_from_env())
    env = init_distributed(dev, cfg.train.dist_timeout_s)
    set_deterministic(cfg.train.deterministic)
    seed_everything(cfg.seed)
    # A resumed run reuses what its directory holds (e.g. tokenizer.json); a new one builds its own.
    ctx = BuildContext(
        device=dev, dist=env, data_dir=Path(data_dir) if data_dir else None, run_dir=out if resume else None
    )
    exp = recipe.build(cfg, ctx)
    # switches this model or launch cannot honour: before anything is written
    check_config(cfg.train, exp.model, exp.dist or env, resolve_precision(cfg.train.precision, dev))
    if env.enabled:
        # Same initial weights everywhere (DDP also broadcasts them); different dropout masks per process.
        torch.manual_seed(cfg.seed + 1000 * env.rank)

    cbs: list[Callback] = []
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _record_engine_change(out, cfg)
        if not resume:
            write_json(
                out / "config.json",
                {
                    "recipe": recipe.name,
                    "preset": preset,
                    "overrides": list(overrides),
                    "config": to_dict(cfg),
                    "llmlab_version": llmlab.__version__,
                },
            )
        for name, write in exp.artifacts.items():
            write(out / name)
        cbs = [MetricsFile(out / "metrics.jsonl"), TensorBoard(out / "tb"), ProgressBar(), *exp.callbacks]
    cbs.extend(callbacks)

    name = f"{recipe.name}:{preset}"
    with _sigterm_ends_training(env):
        outcome = _fit_with_trainer(exp, cfg, out, cbs, resume, dev, exp.dist or env, name)
    if outcome.status == "failed":  # a peer is gone: say so, and how to continue, on every survivor
        _ignore_terminate()  # the launcher's SIGTERM must not cut the record and the message short
        outcome.error = _failure_paragraph(outcome.error or "", recipe.name, preset, overrides, out)

    notes = list(exp.notes)
    if exp.final_eval is not None and outcome.status == "completed":
        if env.is_main:  # decoding whole splits needs no other process
            final = exp.final_eval(exp.model, [*exp.eval_loaders, *exp.final_loaders], out)
            outcome.metrics.update(final.metrics)
            notes += final.notes

    result = None
    if env.is_main:
        if outcome.status == "completed":
            outcome.save(out)
        target = recipe.target(preset)
        achieved = outcome.metrics.get(target.metric) if target else None
        mem, mem_kind = peak_memory(dev)
        result = {
            "recipe": recipe.name,
            "preset": preset,
            "status": outcome.status,
            "metrics": outcome.metrics,
            "target": None
            if target is None
            else {
                "metric": target.metric,
                "value": target.value,
                "higher_is_better": target.higher_is_better,
                "achieved": achieved,
                "met": target.met(achieved),
            },
            "wall_time_s": round(time.perf_counter() - t0, 2),
            "train_time_s": round(outcome.train_time_s, 2),
            "steps": outcome.steps,
            "epochs": round(outcome.epochs, 4),
            "stop_reason": outcome.stop_reason,
            "throughput": {
                "value": outcome.units_seen / max(outcome.train_time_s, 1e-9),
                "unit": f"{outcome.unit}/s",
            },
            "peak_memory_mb": round(mem, 1),
            "peak_memory_kind": mem_kind,
            "n_params": outcome.n_params,
            "seed": cfg.seed,
            "device": dev.type,
            "precision": outcome.precision,
            "world_size": env.world_size,
            "hardware": hardware_info(),
            "versions": versions(),
            "git_commit": git_commit(),
            "started_at": started,
            "finished_at": now_iso(),
            "data": exp.data_description,
            "notes": notes + ([outcome.error] if outcome.error else []),
        }
        write_json(out / "result.json", result)
        from llmlab.report import write_report

        write_report(out)
    if outcome.status == "diverged":
        raise NonFiniteLossError(outcome.error)
    if outcome.status == "failed":
        raise ProcessGroupError(outcome.error)
    if outcome.status == "interrupted":
        raise KeyboardInterrupt
    return result if result is not None else {"status": outcome.status, "rank": env.rank}


def _fit_with_trainer(
    exp: Experiment,
    cfg: Any,
    out: Path,
    cbs: list[Callback],
    resume: bool,
    dev: torch.device,
    env: Any,
    name: str,
) -> Outcome:
    """The usual path: the one Trainer, checkpoints under out/checkpoints, weights as model.safetensors."""
    trainer = Trainer(
        exp.model,
        exp.task,
        exp.optimizer,
        exp.train_loader,
        cfg.train,
        cfg.schedule,
        eval_loaders=exp.eval_loaders,
        final_loaders=exp.final_loaders,
        device=dev,
        dist_env=env,
        checkpoint_dir=out / "checkpoints",
        callbacks=cbs,
        name=name,
    )
    status, error = "completed", None
    try:
        trainer.fit(resume=resume)
        exp.model = trainer.raw_model  # FSDP2 hands back a new, whole module after training
        if trainer.memory_probe is not None:  # memory.json + the report's memory section (first step only)
            trainer.memory_probe.finish(out)
    except NonFiniteLossError as err:
        status, error = "diverged", str(err)
    except _Terminated:
        status = "failed"
        error = (
            "this process received SIGTERM (a launcher such as torchrun stops the surviving processes "
            "when one of them fails; or the job was cancelled)"
        )
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by the user; continue with --resume"
    except Exception as err:  # noqa: BLE001 — only a dead or silent peer is caught; anything else re-raised
        if not (env.multi_process and is_process_group_failure(err)):
            raise
        if os.environ.get("LLMLAB_TRACEBACK") == "1":
            import traceback

            traceback.print_exc()
        status, error = "failed", describe_failure(err, env)

    def save(run_dir: Path) -> None:
        if exp.save_model is not None:  # the recipe's own format (e.g. a Hugging Face model directory)
            exp.save_model(trainer.raw_model, run_dir)
            return
        meta = {"recipe": name.split(":")[0], "preset": name.split(":")[-1], "step": str(trainer.step)}
        save_weights(run_dir / "model.safetensors", trainer.raw_model.state_dict(), metadata=meta)

    return Outcome(
        status=status,
        error=error,
        metrics=trainer.final_metrics,
        steps=trainer.step,
        epochs=trainer.epoch_float,
        train_time_s=trainer.train_time_s,
        units_seen=trainer.units_seen,
        unit=exp.task.unit,
        n_params=trainer.n_params,
        precision=trainer.precision,
        stop_reason=trainer.stop_reason,
        save=save,
    )


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a launcher stopping the survivors of a failed process, a scheduler ending the job)."""


@contextlib.contextmanager
def _sigterm_ends_training(env: DistEnv) -> Iterator[None]:
    """In a multi-process run, SIGTERM ends training with the run record written (status "failed") and the
    paragraph that says how to resume, instead of killing the process without a word. Single-process runs
    keep the default."""
    if not (env.multi_process and threading.current_thread() is threading.main_thread()):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ignore_terminate() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _failure_paragraph(what: str, recipe: str, preset: str, overrides: Sequence[str], out: Path) -> str:
    """The one paragraph a survivor prints: what happened, what is on disk, the command that continues."""
    last = latest_checkpoint(out / "checkpoints")
    kept = (
        f"The last checkpoint, {last}, is complete (checkpoints are written whole by one process, then "
        "renamed into place), and nothing after it is lost but the steps since."
        if last is not None
        else "No checkpoint was written yet (train.checkpoint_every sets how often), so a resumed run starts "
        "from step 0."
    )
    command = " ".join(["llmlab run", recipe, "--preset", preset, *overrides, "--out", str(out), "--resume"])
    return (
        f"the run stopped: {what}. {kept} To continue, start ALL processes again the way they were started "
        f"(torchrun / accelerate launch / deepspeed, or the same RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT "
        f"variables on every node) with: {command} . (LLMLAB_TRACEBACK=1 shows the backend's traceback.)"
    )


def load_run_config(run_dir: Path) -> tuple[Any, Any, str]:
    """(recipe, config dataclass, preset) stored in a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RunDirError(f"{run_dir} is not an llmlab run directory: config.json missing")
    try:
        stored = json.loads(path.read_text())
        recipe = get_recipe(stored["recipe"])
        return recipe, from_dict(recipe.config_cls, stored["config"]), stored["preset"]
    except (json.JSONDecodeError, KeyError) as err:
        raise RunDirError(f"{path} is corrupt: {err}") from err


def rebuild_run(
    run_dir: Path, device: str = "auto", data_dir: Path | str | None = None, overrides: Sequence[str] = ()
) -> tuple[Experiment, torch.device]:
    """A finished run's experiment (model with fresh weights, data, task) rebuilt from its config.json for
    evaluation, and the device it was built on."""
    recipe, cfg, _ = load_run_config(run_dir)
    cfg = recipe.eval_config(apply_overrides(cfg, list(overrides)))
    dev = resolve_device(device)
    seed_everything(cfg.seed)
    ctx = BuildContext(
        device=dev, dist=DistEnv(), data_dir=Path(data_dir) if data_dir else None, run_dir=run_dir
    )
    return recipe.build(cfg, ctx), dev


def evaluate_run(
    run_dir: Path | str,
    split: str = "test",
    device: str = "auto",
    data_dir: Path | str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Rebuild a finished run's model and data from its config and evaluate its final weights on `split`:
    its metrics (plus, for recipes with a final evaluation, that one's metrics and facts, e.g. a BLEU
    signature)."""
    run_dir = Path(run_dir)
    changed = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("decode.")]
    if changed:
        raise ConfigError(
            f"llmlab eval changes only decoding settings (decode.*), not {', '.join(changed)}: the weights "
            "belong to the run's model and data"
        )
    exp, dev = rebuild_run(run_dir, device, data_dir, overrides)
    loaders = {**exp.eval_loaders, **exp.final_loaders}
    if split not in loaders:
        raise ConfigError(f"split {split!r} not available; choose from {', '.join(loaders)}")
    if exp.load_model is not None:
        exp.load_model(exp.model.to(dev), run_dir)
    else:
        load_run_weights(run_dir, exp.model.to(dev), map_location=str(dev))
    metrics: dict[str, Any] = evaluate(exp.model, exp.task, loaders[split], dev)
    if exp.final_eval is not None:
        final = exp.final_eval(exp.model, [split], None)
        metrics.update({k.split("/", 1)[1]: v for k, v in final.metrics.items()})
        metrics.update(final.info)
    return metrics
