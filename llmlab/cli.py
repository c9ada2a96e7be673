"""The `llmlab` command line: list, config, run, sweep, eval, report, data, predict, serve, translate,
generate, export, demo.

Exit codes: 0 success; 1 a failure while running (missing data, divergence, corrupt checkpoint); 2 a bad
command line or config (nothing was written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmlab.config import ConfigError


def _cmd_list(args: argparse.Namespace) -> int:
    from llmlab.recipes import RECIPES

    for recipe in RECIPES.values():
        print(f"{recipe.name}  —  {recipe.description}")
        print(f"    dataset: {recipe.dataset}")
        for preset in recipe.presets:
            target = recipe.target(preset)
            mark = "*" if preset == recipe.default_preset else " "
            goal = f"  [target: {target.describe()}]" if target else ""
            print(f"   {mark}{preset:<9} {recipe.preset_help.get(preset, '')}{goal}")
    print("\n(* default preset)  Run one: llmlab run RECIPE [--preset P] [key=value ...]")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from llmlab.config import to_dict
    from llmlab.runner import resolve_config

    _, cfg, _ = resolve_config(args.recipe, args.preset, args.overrides)
    print(json.dumps(to_dict(cfg), indent=2))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from llmlab.runner import run

    result = run(
        args.recipe,
        args.preset,
        args.overrides,
        out=args.out,
        resume=args.resume,
        device=args.device,
        data_dir=args.data_dir,
    )
    if "metrics" in result:
        _print_result(result, args.out)
    return 0


def _print_result(result: dict, out: Path | None) -> None:
    target = result.get("target")
    lines = [f"{k} = {v:.4f}" for k, v in result["metrics"].items()]
    print("\n".join(lines))
    if target and target.get("achieved") is not None:
        verdict = "met" if target["met"] else "NOT met"
        sign = ">=" if target["higher_is_better"] else "<="
        print(f"target {target['metric']} {sign} {target['value']}: {verdict}")
    speed = result["throughput"]
    print(f"wall time {result['wall_time_s']:.1f}s, {speed['value']:.0f} {speed['unit']}")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from llmlab.sweep import plan_sweep, run_sweep

    plan = plan_sweep(args.recipe, args.preset, args.overrides, args.seeds)
    out = args.out or Path("runs") / f"sweep-{plan.recipe}-{plan.preset}"
    n, seeds = len(plan.runs()), len(plan.seeds)
    print(f"sweep: {n} runs ({n // seeds} grid points x {seeds} seeds) in {out}")
    table = run_sweep(plan, out, device=args.device, data_dir=args.data_dir, plot_metric=args.plot_metric)
    print(table)
    print(f"(written to {out / 'sweep.md'})", file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from llmlab.runner import evaluate_run

    metrics = evaluate_run(
        args.run_dir, split=args.split, device=args.device, data_dir=args.data_dir, overrides=args.overrides
    )
    print(json.dumps({f"{args.split}/{k}": v for k, v in metrics.items()}, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from llmlab.report import compare_runs, load_run, write_report

    runs = [load_run(Path(d)) for d in args.run_dirs]
    if len(runs) == 1:
        path = write_report(runs[0])
        print(path.read_text())
        print(f"(written to {path})", file=sys.stderr)
        return 0
    table = compare_runs(runs)
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"(written to {args.out})", file=sys.stderr)
    print(table)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from llmlab.data import DATASETS, dataset_status, download_dataset, format_status

    if args.data_command == "status":
        names = [args.name] if args.name else list(DATASETS)
        for name in names:
            if name not in DATASETS:
                raise ConfigError(f"unknown dataset {name!r} (datasets: {', '.join(DATASETS)})")
        print(format_status([dataset_status(n, args.data_dir) for n in names]))
        return 0
    if args.name not in DATASETS:
        raise ConfigError(f"unknown dataset {args.name!r} (datasets: {', '.join(DATASETS)})")
    if DATASETS[args.name].bundled:
        print(f"{args.name}: bundled with its library; nothing to download")
        return 0
    path = download_dataset(args.name, args.data_dir)
    print(f"{args.name}: ready in {path}")
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    """One translation per input text or line, in order, to stdout or --output (written atomically)."""
    from llmlab.recipes.translation import Translator

    if args.texts and args.input is not None:
        raise ConfigError("give sentences as arguments or --input FILE, not both")
    if not args.texts and args.input is None:
        raise ConfigError(
            'nothing to translate: give sentences ("A man rides a bike.") or --input FILE (- = stdin)'
        )
    lines = list(args.texts) if args.texts else _read_lines(args.input)
    translator = Translator.from_run(args.run_dir, device=args.device)
    out: list[str] = []
    chunk = 256
    from tqdm.auto import tqdm

    from llmlab.progress import progress_enabled

    with tqdm(total=len(lines), unit="line", disable=not progress_enabled() or len(lines) <= chunk) as bar:
        for start in range(0, len(lines), chunk):
            part = lines[start : start + chunk]
            out += translator.translate(part, beam_size=args.beam, greedy=args.greedy)
            bar.update(len(part))
    text = "".join(t + "\n" for t in out)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from llmlab.fileio import atomic_write_text

        try:
            atomic_write_text(args.output, text)
        except OSError as err:
            raise ConfigError(f"--output {args.output}: cannot write it ({err.strerror or err})") from err
        print(f"{len(out)} translations written to {args.output}", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Samples of a language-model run after each prompt, separated by rules (or JSON with --json)."""
    from llmlab.nn.sampling import SampleConfig
    from llmlab.recipes.gpt_lm import Generator

    try:
        cfg = SampleConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    generator = Generator.from_run(args.run_dir, device=args.device)
    results = []
    for i, prompt in enumerate(args.prompts):
        texts = generator.sample(prompt, cfg, count=args.num_samples, seed=args.seed + i)
        results.append({"prompt": prompt, "samples": texts})
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for r in results:
        for text in r["samples"]:
            print(r["prompt"] + text)
            print("-" * 60)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """A finished run as a Hub-ready folder (llmlab/export/), then, with --push-to-hub, uploaded."""
    from llmlab.export import HubPushError, export_run, push_to_hub
    from llmlab.export.hub import check_repo_id

    if args.push_to_hub and check_repo_id(args.push_to_hub):
        raise ConfigError(f"--push-to-hub: {check_repo_id(args.push_to_hub)}")
    if args.base_model and check_repo_id(args.base_model):
        raise ConfigError(f"--base-model: {check_repo_id(args.base_model)}")
    done = export_run(
        args.run_dir, args.out, force=args.force, repo_id=args.push_to_hub, base_model=args.base_model,
        merged=args.merged,
    )  # fmt: skip
    print(f"exported {args.run_dir} ({done.kind}) to {done.out}:")
    for name, what in sorted(done.files.items()):
        print(f"  {name:<28} {what}")
    print(f"  {'README.md':<28} the model card")
    if args.push_to_hub:
        try:
            url = push_to_hub(done.out, args.push_to_hub, private=args.private)
        except HubPushError as err:
            print(f"llmlab: error: {err}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


def _read_lines(source: str) -> list[str]:
    """Lines of a UTF-8 file (or stdin for "-"), without their line endings; no line is added or lost."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as err:
        raise ConfigError(f"--input {source}: cannot read it ({err.strerror or err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--input {source}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark is not part of the first sentence
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another one
    return [line.removesuffix("\r") for line in lines]


def _cmd_memory(args: argparse.Namespace) -> int:
    """Predicted per-rank memory of a GPT recipe's run (llmlab/memory/command.py)."""
    from llmlab.memory.command import MemoryRequest, memory_command

    request = MemoryRequest(
        args.recipe, args.preset, args.overrides, ranks=args.ranks, rank=args.rank, device=args.device,
        out=args.out, data_dir=args.data_dir,
    )  # fmt: skip
    print(memory_command(request))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Train the stage-1 MLP on MNIST when the data root has it, else on scikit-learn's bundled digits."""
    from llmlab.data import data_root, dataset_status
    from llmlab.runner import default_out_dir, run

    root = data_root(args.data_dir)
    status = dataset_status("mnist", args.data_dir)
    if status.state == "present":
        preset, source = "default", f"real MNIST from {root}"
    else:
        preset, source = (
            "digits",
            (
                f"scikit-learn's bundled 8x8 digits (MNIST is {status.state} in {root}; "
                "`llmlab data download mnist` fetches it)"
            ),
        )
    print(f"llmlab demo: mnist-mlp --preset {preset} on {source}", flush=True)
    out = Path(args.out) if args.out else default_out_dir("mnist-mlp", preset)
    result = run("mnist-mlp", preset, [], out=out, device=args.device, data_dir=args.data_dir)
    _print_result(result, out)
    print(
        f"\nreport: {out / 'report.md'}\ncurves: {out / 'curves.png'}\n"
        f"TensorBoard: tensorboard --logdir {out / 'tb'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llmlab.serve.cli import _positive_int, add_predict_parser, add_serve_parser

    parser = argparse.ArgumentParser(prog="llmlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def device_and_data(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="data root (default: $LLMLAB_DATA, else ~/.cache/llmlab)",
        )

    p = sub.add_parser("list", help="recipes with their dataset, presets and targets")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("config", help="print a recipe's resolved config (preset + overrides)")
    p.add_argument("recipe")
    p.add_argument("--preset", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "run",
        help="train a recipe",
        description="Train a recipe. Overrides are dotted key=value pairs checked against the "
        "recipe's config (see `llmlab config RECIPE`).",
    )
    p.add_argument("recipe")
    p.add_argument("--preset", default=None)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/RECIPE-PRESET-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    device_and_data(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "sweep",
        help="run a grid of config values over seeds and compare them in one table",
        description="Run every combination of the listed values (key=v1,v2; for tuple-valued keys "
        "key=a,b;c,d), each over --seeds seeds, then write sweep.md with mean ± std per grid point; with one "
        "numeric axis also sweep.png, the metric of --plot-metric against it.",
    )
    p.add_argument("recipe")
    p.add_argument("--preset", default=None)
    p.add_argument("--seeds", type=int, default=1, help="repeat each grid point with seeds 0..N-1")
    p.add_argument("--out", type=Path, default=None, help="sweep folder (default: runs/sweep-RECIPE-PRESET)")
    p.add_argument(
        "--plot-metric",
        default=None,
        help="metric of sweep.png (default: the preset's target, else val/loss)",
    )
    device_and_data(p)
    p.add_argument("overrides", nargs="*", metavar="key=v1,v2")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "eval",
        help="evaluate a finished run's weights on a split",
        description="Evaluate a run's final weights on a split. Overrides may change only how the model is "
        "decoded (decode.*, e.g. decode.beam_size=8 decode.length_penalty=1.0): the model and data stay the "
        "run's.",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="test")
    device_and_data(p)
    p.add_argument("overrides", nargs="*", metavar="decode.key=value")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "memory",
        help="predicted per-rank memory of a run: params, grads, optimizer states, activations (stage 6)",
        description="Predict the per-rank memory of a GPT recipe's run from its config (preset + key=value "
        "overrides), before anything is allocated: parameters, gradients and optimizer states as the ZeRO "
        "paper counts them for train.strategy, activations per layer with and without checkpointing, and a "
        "comparison across strategies. --out DIR also writes memory.png, memory.md and "
        "memory_prediction.json.",
    )
    p.add_argument("recipe")
    p.add_argument("--preset", default=None)
    p.add_argument("--ranks", type=_positive_int, default=1, help="data-parallel processes (N)")
    p.add_argument("--rank", type=int, default=0, help="the rank to predict (ZeRO chunks differ by rank)")
    p.add_argument("--out", type=Path, default=None, help="folder for memory.png, memory.md and the JSON")
    device_and_data(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("report", help="write a run's report.md, or compare several runs in one table")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="also write the comparison table to this file")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("data", help="dataset status and downloads")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("status", help="per dataset: present/missing, expected files, checksums")
    q.add_argument("name", nargs="?", default=None)
    q.add_argument("--data-dir", type=Path, default=None)
    q = dsub.add_parser("download", help="download a dataset from its official source, with checksums")
    q.add_argument("name")
    q.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=_cmd_data)

    add_predict_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser(
        "translate",
        help="translate sentences with a trained translation run (stage 5)",
        description="Translate with a finished translation run (e.g. multi30k-transformer): sentences "
        "given as arguments, or one per line from --input FILE (- for stdin). Writes exactly one translation "
        "per input line, in order (an empty line gives an empty line), to stdout or --output FILE. Beam "
        "search with the run's decoding settings unless --beam K or --greedy.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--input", "-i", default=None, metavar="FILE", help="one sentence per line; - reads stdin")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="FILE", help="default: stdout")
    search = p.add_mutually_exclusive_group()
    search.add_argument("--beam", type=_positive_int, default=None, metavar="K", help="beam size")
    search.add_argument("--greedy", action="store_true", help="greedy search instead of beam search")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser(
        "generate",
        help="sample text from a trained language-model run (stage 6)",
        description="Sample continuations of each PROMPT from a language-model run (e.g. shakespeare-gpt), "
        "on a KV cache. --temperature 0 is greedy; top-k, top-p and the repetition penalty are applied as in "
        "HF transformers' generate. The same --seed gives the same samples.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument(
        "--max-new-tokens", type=int, default=200, help="tokens to add (past the context, the window slides)"
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-samples", type=_positive_int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print [{prompt, samples}] as JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "export",
        help="a finished run as a folder to share on the Hugging Face Hub (weights, tokenizer, model card)",
        description="Export a finished run into --out DIR: the weights in safetensors, in Hugging Face's "
        "format where the model has a twin (BERT, GPT-2 and LLaMA directories for transformers' Auto* "
        "classes, LoRA adapters for peft), else model.safetensors + the llmlab config.json; the tokenizer "
        "files; a model card README.md (Hub metadata, task, data, metrics and the command that produced "
        "them, training setup, limitations, how to load); the run record under llmlab_run/. "
        "--push-to-hub REPO_ID then uploads the folder with huggingface_hub (token: HF_TOKEN or `hf auth "
        "login`); if that fails, the folder stays as exported. Example: llmlab export runs/RUN --out "
        "exports/RUN --push-to-hub my-user/my-model",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write (new/empty)")
    p.add_argument("--force", action="store_true", help="replace a previous llmlab export in --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="then upload it to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument(
        "--base-model", default=None, metavar="REPO_ID",
        help="adapters (llama-lora): the base model's Hub id, recorded in adapter_config.json and the card",
    )  # fmt: skip
    p.add_argument(
        "--merged", action="store_true",
        help="adapters: also write merged/, the base with the update merged in (rebuilt from the run's init)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "demo", help="train the stage-1 MLP end to end (MNIST if present, else bundled digits)"
    )
    p.add_argument("--out", type=Path, default=None)
    device_and_data(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run R a=1 --preset P b=2`); argparse leaves the later ones.
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if "=" not in e or e.startswith("-")]
    for name in (
        "texts",
        "prompts",
    ):  # `translate RUN --greedy "A man ..."`: texts after an option land in extra
        if hasattr(args, name):
            setattr(args, name, list(getattr(args, name)) + [e for e in extra if not e.startswith("-")])
            extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from llmlab.data.store import DataCorruptError, DataDownloadError, DataMissingError
    from llmlab.data.subword import TokenizerError
    from llmlab.report import RunDirError
    from llmlab.train.checkpoint import CheckpointError
    from llmlab.train.distributed import DeviceError, ProcessGroupError
    from llmlab.train.trainer import NonFiniteLossError

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"llmlab: error: {err}", file=sys.stderr)
        return 2
    except (
        DataMissingError,
        DataCorruptError,
        DataDownloadError,
        CheckpointError,
        NonFiniteLossError,
        DeviceError,
        ProcessGroupError,
        RunDirError,
        TokenizerError,
    ) as err:
        print(f"llmlab: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    finally:
        _shutdown_distributed()


def _shutdown_distributed() -> None:
    """Destroy the process groups while the interpreter is whole, collecting reference cycles (DeepSpeed's
    engine, gloo work) first. Left to interpreter teardown, tensors that gloo's worker threads hold can be
    freed after Python is gone, which aborts the process ("terminate called without an active exception")
    after a run that completed; CI saw this once, on a resumed ZeRO-3 run (pytorch/pytorch#179291)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


if __name__ == "__main__":
    raise SystemExit(main())
