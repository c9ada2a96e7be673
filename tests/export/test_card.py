"""The model card: Hub metadata that huggingface_hub parses (library, task, tags, model-index whose values
are result.json's), the metrics with the command that produced them — a command that, run again, resolves to
exactly the run's config —, the training setup, limitations and how to load."""

from __future__ import annotations

import shlex

from llmlab.config import to_dict
from llmlab.export.card import run_command
from llmlab.runner import resolve_config
from tests.export.helpers import front_matter, read_json, section


def test_metadata_is_the_run_record(train, export):
    run_dir, out = train("shakespeare-gpt"), export("shakespeare-gpt")
    result = read_json(run_dir / "result.json")
    meta = front_matter(out / "README.md")
    assert {"llmlab", "shakespeare-gpt", "gpt2"} <= set(meta["tags"])
    assert "datasets" not in meta  # synthetic text: no Hub dataset is claimed
    (entry,) = meta["model-index"]
    (block,) = entry["results"]
    assert block["task"]["type"] == "text-generation" and block["dataset"]["split"] == "validation"
    figures = {m["name"]: m["value"] for m in block["metrics"]}
    val = {k: v for k, v in result["metrics"].items() if k.startswith("val/")}
    assert figures.keys() == val.keys()
    assert all(abs(figures[k] - v) < 1e-6 for k, v in val.items())
    assert {m["type"] for m in block["metrics"]} >= {"loss", "perplexity"}


def test_results_show_every_metric_and_the_command_that_reproduces_the_config(train, export):
    run_dir, out = train("mnist-mlp"), export("mnist-mlp")
    stored, result = read_json(run_dir / "config.json"), read_json(run_dir / "result.json")
    results = section(out / "README.md", "Results")
    for name in result["metrics"]:
        assert f"`{name}`" in results
    command = run_command(stored, result)
    assert f"```bash\n{command}\n```" in results
    argv = shlex.split(command)
    assert argv[:7] == ["llmlab", "run", "mnist-mlp", "--preset", "smoke", "--device", "cpu"]
    _, cfg, _ = resolve_config(argv[2], argv[4], argv[7:])
    assert to_dict(cfg) == stored["config"]  # the command trains this very config
    setup = section(out / "README.md", "Training setup")
    assert "2 steps" in setup and "fp32" in setup and result["git_commit"] in setup
    limits = section(out / "README.md", "Limitations")
    assert "not on real data" in limits
    assert "model.load_state_dict" in section(out / "README.md", "How to load")


def test_command_of_a_distributed_run():
    stored = {"recipe": "gpt-tp", "preset": "cpu", "overrides": ["parallel.tp=2", "samples.prompt=a b"]}
    assert run_command(stored, {"world_size": 4, "device": "cpu"}) == (
        "torchrun --nproc_per_node 4 -m llmlab run gpt-tp --preset cpu --device cpu parallel.tp=2 "
        "'samples.prompt=a b'"
    )
