"""The export of one run: check it is a finished run, let its recipe write the model (`exporter_for`), then
add the model card, the run record and a manifest; all into a temporary folder that takes --out's place only
when complete, so a failed export leaves nothing half-written (and an existing export is replaced only with
--force). The folder layout follows the Hugging Face Hub's conventions (https://huggingface.co/docs/hub/
model-cards, https://huggingface.co/docs/hub/models-uploading).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab.config import ConfigError
from llmlab.export.run import EXPORT_MANIFEST, RECORD_DIR, RunExport
from llmlab.report import RunDirError
from llmlab.train.checkpoint import sha256_file

RECORD_FILES = ("config.json", "result.json", "metrics.jsonl", "init.json")
FORMAT = "llmlab-export"


@dataclass
class ExportResult:
    out: Path
    kind: str
    files: dict[str, str]


def open_run(run_dir: Path) -> tuple[Any, Any, dict, dict]:
    """(recipe, config, config.json, result.json) of a finished run; RunDirError for anything else."""
    from llmlab.config import from_dict
    from llmlab.recipes import RECIPES

    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise RunDirError(
            f"{run_dir} is not an llmlab run directory (no config.json): pass the folder `llmlab run` wrote "
            "(--out), e.g. runs/RECIPE-PRESET-TIME"
        )
    stored = _read_json(config_path)
    if "model_type" in stored:
        raise RunDirError(
            f"{run_dir} is a Hugging Face model directory, not an llmlab run: it is already in the Hub's "
            "format (upload it with `hf upload REPO_ID DIR`)"
        )
    recipe_name = stored.get("recipe")
    if recipe_name not in RECIPES:
        raise RunDirError(
            f"{config_path} names the recipe {recipe_name!r}, which this llmlab does not know (recipes: "
            f"{', '.join(RECIPES)}): a run of another llmlab version, or a damaged config.json"
        )
    recipe = RECIPES[recipe_name]
    try:
        cfg = from_dict(recipe.config_cls, stored["config"])
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise RunDirError(f"{config_path}: its config does not fit recipe {recipe_name} ({err})") from err
    result_path = run_dir / "result.json"
    resume = f"llmlab run {recipe_name} --preset {stored.get('preset')} --out {run_dir} --resume"
    if not result_path.is_file():
        raise RunDirError(
            f"{run_dir} has no result.json: the run is still going or was killed, and has no final weights "
            f"to export. Finish it first (`{resume}`)"
        )
    result = _read_json(result_path)
    status = result.get("status")
    if status != "completed":
        why = {"diverged": "its loss diverged", "interrupted": "it was interrupted"}.get(
            status, f"status {status!r}"
        )
        raise RunDirError(
            f"{run_dir} did not finish ({why}): it has no final weights to export. "
            + (f"Continue it with `{resume}`" if status == "interrupted" else "Fix its config, run it again")
        )
    return recipe, cfg, stored, result


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} is corrupt: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is corrupt: expected a JSON object")
    return data


def check_out(out: Path, run_dir: Path, force: bool) -> None:
    """Refuse (ConfigError: nothing written) an --out that holds anything but a previous export (and that
    only with --force), or that is the run directory or one of its parents."""
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents:
        raise ConfigError(f"--out {out} is the run directory or contains it: choose a folder of its own")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(
            f"--out {out} exists and is not empty: choose another folder, or pass --force to replace a "
            "previous export there"
        )
    if not (out / EXPORT_MANIFEST).is_file():
        raise ConfigError(
            f"--out {out} holds files that are not an llmlab export (no {EXPORT_MANIFEST}): --force replaces "
            "only a previous export; choose another folder or empty it yourself"
        )


def exporter_for(recipe: Any, cfg: Any) -> Callable[[RunExport, Path], None]:
    """The writer of a run's model: the Hugging Face twin's format where one exists (BERT; GPT-2 and LLaMA,
    every language-model recipe; PEFT adapters of LoRA / QLoRA fine-tunes), else model.safetensors + the
    llmlab config (plain.py). Picked here, above the recipes, so that recipes never import the export."""
    from llmlab.recipes.agnews_bert import AgNewsBert
    from llmlab.recipes.gpt_lm import _LMRecipe
    from llmlab.recipes.llama_lora import LlamaLoRA

    if isinstance(recipe, LlamaLoRA) and cfg.finetune.method != "full":
        from llmlab.export.adapter import export_adapter

        return export_adapter
    if isinstance(recipe, _LMRecipe):
        from llmlab.export.causal_lm import export_causal_lm

        return export_causal_lm
    if isinstance(recipe, AgNewsBert):
        from llmlab.export.bert import export_hf_classifier

        return export_hf_classifier
    from llmlab.export.plain import export_plain

    return export_plain


def export_run(
    run_dir: Path | str,
    out: Path | str,
    force: bool = False,
    repo_id: str | None = None,
    base_model: str | None = None,
    merged: bool = False,
) -> ExportResult:
    """Export the finished run `run_dir` into the folder `out` (see llmlab/export/__init__.py)."""
    from llmlab.export.card import write_card
    from llmlab.fileio import atomic_dir

    run_dir, out = Path(run_dir), Path(out)
    recipe, cfg, stored, result = open_run(run_dir)
    check_out(out, run_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = RunExport(
        run_dir=run_dir, recipe=recipe, cfg=cfg, stored=stored, result=result, ref=repo_id or str(out),
        title=repo_id or out.resolve().name, repo_id=repo_id, base_model=base_model, merged=merged,
    )  # fmt: skip
    with atomic_dir(out) as tmp:
        exporter_for(recipe, cfg)(run, tmp)
        _copy_record(run, tmp)
        write_card(run, tmp)
        _write_manifest(run, tmp)
        _share_permissions(tmp)
    return ExportResult(out, run.kind, dict(run.files))


def _share_permissions(folder: Path) -> None:
    """The modes of files written by `open` (the umask's), also for those written through temporary files
    (0600) and the folder itself (mkdtemp: 0700): an export is meant to be read by others."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _copy_record(run: RunExport, out: Path) -> None:
    record = out / RECORD_DIR
    record.mkdir()
    for name in RECORD_FILES:
        if (run.run_dir / name).is_file():
            shutil.copyfile(run.run_dir / name, record / name)
    run.files[f"{RECORD_DIR}/"] = "the run record: llmlab config, result, metrics per step (provenance)"
    if (run.run_dir / "curves.png").is_file():
        shutil.copyfile(run.run_dir / "curves.png", out / "curves.png")
        run.files["curves.png"] = "training and validation curves"


def _write_manifest(run: RunExport, out: Path) -> None:
    import llmlab
    from llmlab.train.record import now_iso

    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "version": 1,
        "kind": run.kind,
        "recipe": run.name,
        "preset": run.stored.get("preset"),
        "run_dir": str(run.run_dir.resolve()),
        "exported_at": now_iso(),
        "llmlab_version": llmlab.__version__,
        "repo_id": run.repo_id,
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files},
    }
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
