"""Stage 3 benchmark: the padding length bucketing removes, and packed vs unpacked bidirectional RNN time.

    python benchmarks/stage3_packing.py [--data-dir DIR] [--batch 64] [--max-len 400] [--epochs 5]
        [--time-len 220] [--cell lstm] [--repeats 5] [--threads N]

Data: the IMDB training split exactly as the `imdb-lstm` default preset builds it (`Recipe.build`: 2,500 of
the 25,000 training reviews held out for validation, the vocabulary built on the rest, reviews cut to
--max-len tokens head+tail), so the lengths are the recipe's. Needs the IMDB data (LLMLAB_DATA or --data-dir).

Padding: --epochs training epochs (the preset trains 5) in batches of --batch reviews, each epoch's batches
drawn as llmlab.data.bucket.padding_report does; the mean over the epochs of the share of the token slots
that are padding, for random batches each trimmed to their longest review ("unbucketed"), for
the recipe's length-bucketed batches (BucketLoader, data.bucket_batches of the preset), for random batches all
padded to --max-len (a plain [N, max_len] tensor), and for the whole set sorted by length (the floor).

Time: one random batch of --batch training reviews (seeded), cut to --time-len tokens, through one
bidirectional layer (embedding size and hidden size of the preset, 128 and 128), forward with autograd and
then backward of a fixed random weighting of all outputs (gradients of the weights and of the input), by:
- "packed": torch.nn.LSTM/GRU(bidirectional=True) on pack_padded_sequence(..., enforce_sorted=False);
- "unpacked": the recipe's layer (llmlab.models.rnn.RecurrentLayer): a forward and a reverse torch.nn RNN on
  the padded batch, the reverse one over each review reversed within its own length — equal to the packed
  result (checked here as well: the largest output difference is printed), without packing.
The two are timed in interleaved repeats (--repeats, after one warm-up) so machine noise hits both alike; the
figures are medians over the repeats. Threads: --threads, else torch's default (printed). Times depend on the
machine and on what else runs on it: read the ratio more than the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmlab.config import apply_overrides
from llmlab.data.bucket import padding_report
from llmlab.models.rnn import RecurrentLayer
from llmlab.recipes import get_recipe
from llmlab.recipes.base import BuildContext


def recipe_lengths(recipe: str, max_len: int, data_dir: Path | None) -> tuple[torch.Tensor, object]:
    """The encoded training reviews' lengths as the recipe's default preset builds them, and its config."""
    rec = get_recipe(recipe)
    cfg = apply_overrides(rec.config("default"), [f"data.max_len={max_len}", "baseline=false"])
    exp = rec.build(cfg, BuildContext(device=torch.device("cpu"), data_dir=data_dir))
    return exp.train_loader.tensors[1].cpu(), cfg


def time_pass(run, x: torch.Tensor, weights: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(forward s, backward s, outputs [B, T, 2H]) of `run(x)` and the backward of sum(out * weights)."""
    t0 = time.perf_counter()
    out = run(x)  # [B, T, 2H], zeros at padded steps
    t1 = time.perf_counter()
    (out * weights).sum().backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--recipe", default="imdb-lstm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=400, help="tokens kept per review (data.max_len)")
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs of batches the padding is averaged over"
    )
    parser.add_argument("--time-len", type=int, default=220, help="tokens per review in the timed batch")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lengths, cfg = recipe_lengths(args.recipe, args.max_len, args.data_dir)
    reports = [
        padding_report(
            lengths,
            args.batch,
            bucket_batches=cfg.data.bucket_batches,
            seed=args.seed,
            epoch=e,
            width=args.max_len,
        )
        for e in range(args.epochs)
    ]
    report = {key: statistics.mean(r[key] for r in reports) for key in reports[0]}
    n = len(lengths)
    per_epoch = ", ".join(f"{100 * r['bucketed']:.2f}%" for r in reports)
    print(
        f"{args.recipe} default preset: {n} training reviews, max_len {args.max_len} "
        f"({cfg.data.truncation}), mean length {lengths.double().mean():.1f}, batch {args.batch}; mean over "
        f"{args.epochs} epoch(s) of batches (seed {args.seed}); bucketed per epoch: "
        f"{per_epoch}\n"
    )
    print("| batches | padding share of the token slots |")
    print("|---|---:|")
    rows = [
        ("random, each trimmed to its longest review (unbucketed)", "random_trimmed"),
        (f"length-bucketed (BucketLoader, bucket_batches={cfg.data.bucket_batches}; the recipe)", "bucketed"),
        (f"random, all padded to max_len {args.max_len}", "fixed"),
        ("whole set sorted by length (the floor)", "sorted"),
    ]
    for label, key in rows:
        print(f"| {label} | {100 * report[key]:.1f}% |")

    # One random batch, cut to --time-len tokens.
    g = torch.Generator().manual_seed(args.seed)
    rows_idx = torch.randperm(n, generator=g)[: args.batch]
    lens = lengths[rows_idx].clamp(max=args.time_len)  # [B]
    width = int(lens.max())
    embed, hidden = cfg.model.embed_dim, cfg.model.hidden
    x = torch.randn(args.batch, width, embed, generator=g)  # [B, T, E], the embeddings of the batch
    x[torch.arange(width)[None, :] >= lens[:, None]] = 0.0  # padding, as the embedding of index 0
    weights = torch.randn(args.batch, width, 2 * hidden, generator=g)  # [B, T, 2H]
    weights[torch.arange(width)[None, :] >= lens[:, None]] = 0.0  # only valid outputs count (as in packed)

    cell = nn.LSTM if args.cell == "lstm" else nn.GRU
    torch.manual_seed(args.seed)
    packed_rnn = cell(embed, hidden, bidirectional=True, batch_first=True)
    layer = RecurrentLayer(cell, embed, hidden, bidirectional=True)
    with torch.no_grad():  # the same weights in both: torch's reverse direction is our `bwd` RNN
        for name, p in packed_rnn.named_parameters():
            target = layer.bwd if name.endswith("_reverse") else layer.fwd
            getattr(target, name.removesuffix("_reverse")).copy_(p)

    def packed(inp: torch.Tensor) -> torch.Tensor:
        seq = pack_padded_sequence(inp, lens, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(packed_rnn(seq)[0], batch_first=True, total_length=width)[0]

    def unpacked(inp: torch.Tensor) -> torch.Tensor:
        return layer(inp, lens)[0]

    paths = {"packed (pack_padded_sequence)": packed, "unpacked (the recipe's RecurrentLayer)": unpacked}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in paths}
    outputs = {}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up
        for name, run in paths.items():
            fwd, bwd, out = time_pass(run, x.clone().requires_grad_(True), weights)
            outputs[name] = out
            if repeat:
                times[name][0].append(fwd)
                times[name][1].append(bwd)
    diff = (outputs[list(paths)[0]] - outputs[list(paths)[1]]).abs().max().item()
    pad_share = 1 - lens.sum().item() / (args.batch * width)

    print(
        f"\n{args.cell.upper()} timing: one random batch of {args.batch} reviews cut to {args.time_len} "
        f"tokens (padded width {width}, lengths {int(lens.min())}-{width}, {100 * pad_share:.1f}% padding), "
        f"embedding {embed}, hidden {hidden}, bidirectional, float32; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); median of {args.repeats} interleaved repeats. Largest output "
        f"difference packed vs unpacked: {diff:.1e}\n"
    )
    print("| path | forward (s) | backward (s) | backward repeats (s) |")
    print("|---|---:|---:|---|")
    for name, (fwd, bwd) in times.items():
        reps = ", ".join(f"{t:.3f}" for t in bwd)
        print(f"| {name} | {statistics.median(fwd):.3f} | {statistics.median(bwd):.3f} | {reps} |")
    (pf, pb), (uf, ub) = ((statistics.median(f), statistics.median(b)) for f, b in times.values())
    print(f"\nbackward packed / unpacked: {pb / ub:.1f}x; forward packed / unpacked: {pf / uf:.1f}x")


if __name__ == "__main__":
    main()
