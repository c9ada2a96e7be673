"""The model card, README.md, of an exported run: YAML metadata the Hub reads, then what a reader needs.

Metadata (Hugging Face Hub, "Model Cards", https://huggingface.co/docs/hub/model-cards, and hub-docs'
modelcard.md for the model-index): library_name, pipeline_tag, tags, datasets (Hub dataset ids, only for
the real datasets the run read), base_model (a Hub id, for fine-tunes and adapters), metrics, and a
model-index with one entry per final validation / test figure of result.json (task, dataset, split, value),
which the Hub shows as the model's evaluation results. Written with huggingface_hub's ModelCardData, so the
YAML is what the Hub parses.

Body, from the run record (config.json, result.json): the task and data; the results with the command that
produced them (rebuilt from config.json's recipe, preset and overrides, and result.json's world size and
device); the training setup; limitations (the recipe's, the run's notes, an unmet target, synthetic data);
what the files are and how to load them (the recipe's export hook wrote that part).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from llmlab.export.run import RECORD_DIR, RunExport

# the llmlab datasets that are on the Hub, by their Hub ids (the card's `datasets` and model-index)
HUB_DATASETS = {
    "mnist": "ylecun/mnist",
    "cifar10": "uoft-cs/cifar10",
    "imdb": "stanfordnlp/imdb",
    "ag_news": "fancyzhx/ag_news",
    "multi30k": "bentrevett/multi30k",
    "iwslt2017": "IWSLT/iwslt2017",
    "tinyshakespeare": "karpathy/tiny_shakespeare",
}
DATASET_NAMES = {
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "imdb": "IMDB",
    "ag_news": "AG News",
    "multi30k": "Multi30k",
    "iwslt2017": "IWSLT 2017",
    "tinyshakespeare": "TinyShakespeare",
    "chinese_novels": "the four classical Chinese novels",
    "tang_poems": "Tang poems",
}
TASK_NAMES = {
    "image-classification": "Image Classification",
    "text-classification": "Text Classification",
    "translation": "Translation",
    "text-generation": "Text Generation",
}
METRIC_TYPES = {"ppl": "perplexity"}  # else the name itself: loss, accuracy, ...
SPLITS = {"val": "validation", "test": "test"}


def run_command(stored: dict[str, Any], result: dict[str, Any]) -> str:
    """The command line that trains this run again: `llmlab run RECIPE --preset P --device D overrides...`,
    under `torchrun --nproc_per_node N -m llmlab` for a run of N processes."""
    world = int(result.get("world_size") or 1)
    head = ["llmlab"] if world == 1 else ["torchrun", "--nproc_per_node", str(world), "-m", "llmlab"]
    args = ["run", str(stored["recipe"]), "--preset", str(stored.get("preset"))]
    if result.get("device"):
        args += ["--device", str(result["device"])]
    return shlex.join([*head, *args, *map(str, stored.get("overrides") or [])])


def dataset_of(run: RunExport) -> tuple[str, str | None, str]:
    """(the data in words, as result.json describes it; its Hub dataset id or None; a short name: the Hub
    id, llmlab's dataset name, a corpus file's name, or "synthetic" for made-up data)."""
    data = run.stored.get("config", {}).get("data", {}) or {}
    source = data.get("corpus", data.get("source"))
    described = str(run.result.get("data") or source or run.recipe.dataset)
    if isinstance(source, str) and source.startswith("synthetic"):
        return described, None, "synthetic"
    if source == "digits":  # mnist-mlp's offline stand-in: scikit-learn's 8x8 digits
        return described, None, "sklearn-digits"
    if source in (None, "full", "carve-from-test"):  # the recipe's dataset, in whole or in part
        source = run.recipe.dataset
    hub_id = HUB_DATASETS.get(source)
    return described, hub_id, hub_id or Path(str(source)).name


def _dataset_name(run: RunExport, key: str) -> str:
    data = run.stored.get("config", {}).get("data", {}) or {}
    source = data.get("corpus", data.get("source"))
    if source in (None, "full", "carve-from-test"):
        source = run.recipe.dataset
    return DATASET_NAMES.get(str(source), key)


def _metric_type(name: str) -> str:
    metric = name.split("/", 1)[-1]
    if metric.startswith("bleu"):
        return "bleu"
    return METRIC_TYPES.get(metric, metric)


def eval_metrics(run: RunExport) -> dict[str, float]:
    """The final validation and test figures of result.json, "split/name" -> value."""
    metrics = run.result.get("metrics") or {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.split("/", 1)[0] in SPLITS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def front_matter(run: RunExport, model_name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    _, hub_id, key = dataset_of(run)
    metrics = eval_metrics(run)
    task = run.task
    results = []
    if task:
        for name, value in metrics.items():
            split, _, metric = name.partition("/")
            results.append(
                EvalResult(
                    task_type=task,
                    task_name=TASK_NAMES.get(task, task),
                    dataset_type=key,
                    dataset_name=_dataset_name(run, key),
                    dataset_split=SPLITS[split],
                    metric_type=_metric_type(name),
                    metric_name=name,
                    metric_value=round(value, 6),
                )
            )
    data = ModelCardData(
        library_name=run.library,
        pipeline_tag=task if run.library in ("transformers", "peft") else None,
        tags=list(dict.fromkeys(["llmlab", run.name, *run.tags])),
        datasets=[hub_id] if hub_id else None,
        base_model=run.base,
        metrics=sorted({_metric_type(n) for n in metrics}) or None,
        model_name=model_name,
        eval_results=results or None,
    )
    return data.to_yaml()


def results_section(run: RunExport, command: str) -> str:
    from llmlab.report.markdown import fmt_metric

    metrics = run.result.get("metrics") or {}
    target = run.result.get("target") or {}
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| `{k}` | {fmt_metric(k, v)} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    lines = ["## Results", "", *rows, ""]
    if target.get("metric"):
        sign = ">=" if target.get("higher_is_better", True) else "<="
        verdict = {True: "met", False: "**not met**", None: "not evaluated"}[target.get("met")]
        lines += [f"Target of the preset: `{target['metric']}` {sign} {target['value']}: {verdict}.", ""]
    lines += [
        "`val/*` figures are on the validation split (the one used for choices), `test/*` on the test split, "
        "evaluated once at the end. They were produced by:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"(rebuilt from the run record: `{RECORD_DIR}/config.json` holds the recipe, preset, overrides and "
        f"the fully resolved config; `{RECORD_DIR}/result.json` the figures, hardware and versions; the data "
        "root is `$LLMLAB_DATA` or `--data-dir`.)",
    ]
    return "\n".join(lines)


def setup_section(run: RunExport) -> str:
    r, cfg = run.result, run.stored.get("config", {})
    train, optim, sched = cfg.get("train", {}), cfg.get("optim", {}), cfg.get("schedule", {})
    hw = r.get("hardware") or {}
    versions = r.get("versions") or {}
    length = f"{r.get('steps')} steps ({r.get('epochs', 0):.3g} epochs)"
    if r.get("stop_reason"):
        length += f", stopped by {r['stop_reason']}"
    unit = train.get("batch_unit", "samples")
    opt = f"{optim.get('name')}, lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}"
    if optim.get("betas"):
        opt += f", betas {tuple(optim['betas'])}"
    schedule = sched.get("name", "constant")
    if sched.get("warmup_steps") or sched.get("warmup_frac"):
        schedule += f", warmup {sched.get('warmup_steps') or sched.get('warmup_frac')}"
    accum = train.get("grad_accum") or 1
    accumulation = f" ({accum} accumulated micro-batches)" if accum > 1 else ""
    device = r.get("device")
    if device == "cuda" and hw.get("gpu"):
        device = f"cuda ({hw['gpu']})"
    rows = [
        ("recipe / preset", f"`{run.name}` / `{run.stored.get('preset')}`"),
        ("overrides", ", ".join(f"`{o}`" for o in run.stored.get("overrides") or []) or "none"),
        ("training", length),
        ("batch", f"{train.get('batch_size')} {unit}" + accumulation),
        ("optimizer", opt),
        ("schedule", schedule),
        ("precision", r.get("precision")),
        ("engine", f"{train.get('strategy')}, world size {r.get('world_size')}"),
        ("device", f"{device} ({hw.get('cpu_count', '?')} CPU cores)" if device == "cpu" else device),
        ("seed", r.get("seed")),
        ("parameters", f"{r.get('n_params'):,}" if isinstance(r.get("n_params"), int) else r.get("n_params")),
        ("wall time", f"{r.get('wall_time_s', 0):.1f} s"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("git commit", f"`{r.get('git_commit')}`" if r.get("git_commit") else "unknown"),
        ("finished", r.get("finished_at")),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
    return f"## Training setup\n\n| | |\n|---|---|\n{table}"


def limitations(run: RunExport) -> list[str]:
    described, _, key = dataset_of(run)
    out = []
    if key == "synthetic":
        out.append(
            f"Trained on {described}, not on real data (a test or smoke configuration): the figures say the "
            "pipeline works, not how good the model is on the task."
        )
    target = run.result.get("target") or {}
    if target.get("met") is False:
        out.append(f"The preset's target ({target.get('metric')}) was not reached.")
    out += run.limitations
    out.append(
        "A small model trained in a teaching lab (llmlab): no safety evaluation, no bias evaluation; do not "
        "use it for decisions about people."
    )
    return out


def write_card(run: RunExport, out: Path) -> Path:
    """README.md into the export folder `out` (the recipe's export hook has filled `run` in)."""
    model_name = run.title
    described, hub_id, _ = dataset_of(run)
    command = run_command(run.stored, run.result)
    init = run.init
    task = TASK_NAMES.get(run.task or "", run.task or "see the recipe")
    data = f"[{hub_id}](https://huggingface.co/datasets/{hub_id})" if hub_id else "not on the Hub"
    parts = [
        f"---\n{front_matter(run, model_name).rstrip()}\n---",
        f"# {model_name}",
        f"{run.recipe.description}. Trained with the llmlab recipe `{run.name}` "
        f"(preset `{run.stored.get('preset')}`) and exported with `llmlab export`.",
        f"## Model\n\n{(run.architecture or type(run.recipe).__name__).rstrip('.')}.",
        f"## Task and data\n\n- task: {task}\n- data: {described} (Hub dataset: {data})"
        + (f"\n- started from: {init.get('source')} ({init.get('kind')})" if init else ""),
        results_section(run, command),
        setup_section(run),
        "## Limitations\n\n" + "\n".join(f"- {x}" for x in limitations(run)),
        "## How to load\n\n" + run.usage,
        "## Files\n\n| file | what it is |\n|---|---|\n"
        + "\n".join(f"| `{k}` | {v} |" for k, v in sorted(run.files.items()))
        + "\n| `llmlab_export.json` | what was exported, from which run, with the files' sha256 |",
    ]
    notes = [str(n) for n in run.result.get("notes") or [] if n]
    if notes:
        parts.append("## Notes from the run\n\n" + "\n".join(f"- {n}" for n in notes))
    if (out / "curves.png").is_file():
        parts.append("## Curves\n\n![training curves](curves.png)")
    path = out / "README.md"
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path
