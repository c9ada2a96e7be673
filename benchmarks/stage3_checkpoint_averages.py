"""Stage 3 experiment: what averaging a run's weights would give, read off its dense checkpoints.

    python benchmarks/stage3_checkpoint_averages.py RUN_OR_SWEEP_DIR [--data-dir DIR] [--out FILE]

For each finished run (RUN_OR_SWEEP_DIR itself, or every run folder inside a sweep folder) its kept
checkpoints (`checkpoints/step_*`) are averaged in float64 and evaluated on the run's val and test splits,
the model and data rebuilt from the run's config as `llmlab eval` does (`runner.rebuild_run`):
- "last": the last checkpoint alone (the run's own final weights);
- "mean from F": the plain mean of the checkpoints at steps >= F × the run's steps (what
  `train.weight_average=swa train.average_start=F train.average_every=<checkpoint_every>` ends with);
- "ema D from F": an exponential average over the same checkpoints with a per-step decay D, applied on the
  checkpoint grid as D^k for checkpoints k steps apart (an approximation of `train.weight_average=ema`, which
  updates after every step).
The runs need many checkpoints: train them with `train.checkpoint_every=50 train.keep_checkpoints=40` (e.g.
`llmlab sweep imdb-lstm --seeds 3 --out runs/s3-lstm-dense train.checkpoint_every=50 train.keep_checkpoints=40
baseline=false`). Accuracies are printed per run and setting, and written as JSON to --out (default:
RUN_OR_SWEEP_DIR/checkpoint_averages.json). docs/results.md ("Weight averaging, measured") has the figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llmlab.runner import rebuild_run
from llmlab.train.checkpoint import list_checkpoints, load_checkpoint
from llmlab.train.trainer import evaluate

MEAN_FROM = (0.4, 0.6, 0.8)
EMA = ((0.998, 0.2), (0.998, 0.4), (0.999, 0.2), (0.999, 0.4))


def averages(states: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of every setting (module docstring), float64, from {step: state dict}."""
    last = max(states)
    out = {"last": {k: v.double() for k, v in states[last].items()}}
    for start in MEAN_FROM:
        steps = [s for s in sorted(states) if s >= start * last]
        out[f"mean from {start}"] = {
            k: sum(states[s][k].double() for s in steps) / len(steps) for k in states[last]
        }
    for decay, start in EMA:
        avg, prev = None, None
        for s in (s for s in sorted(states) if s >= start * last):
            cur = {k: v.double() for k, v in states[s].items()}
            if avg is None:
                avg = cur
            else:
                d = decay ** (s - prev)  # k steps of decay on the checkpoint grid
                avg = {k: d * avg[k] + (1 - d) * cur[k] for k in avg}
            prev = s
        out[f"ema {decay} from {start}"] = avg
    return out


def evaluate_run(run_dir: Path, data_dir: Path | None) -> dict[str, dict[str, float]]:
    exp, device = rebuild_run(run_dir, "cpu", data_dir)
    loaders = {**exp.eval_loaders, **exp.final_loaders}
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if len(ckpts) < 2:
        raise SystemExit(f"{run_dir}: {len(ckpts)} checkpoint(s); train with train.checkpoint_every=50 ...")
    states = {int(p.name.split("_")[1]): load_checkpoint(p)[0] for p in ckpts}
    results = {}
    for name, weights in averages(states).items():
        exp.model.load_state_dict({k: v.to(states[max(states)][k].dtype) for k, v in weights.items()})
        results[name] = {
            split: round(100 * evaluate(exp.model, exp.task, loaders[split], device)["accuracy"], 2)
            for split in ("val", "test")
            if split in loaders
        }
        print(f"{run_dir.name}  {name:18s}  {results[name]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = (
        [args.run_dir]
        if (args.run_dir / "config.json").exists()
        else sorted(p for p in args.run_dir.iterdir() if (p / "config.json").exists())
    )
    if not runs:
        raise SystemExit(f"{args.run_dir}: no run folder (config.json) here or one level down")
    out = {run.name: evaluate_run(run, args.data_dir) for run in runs}
    path = args.out or args.run_dir / "checkpoint_averages.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
