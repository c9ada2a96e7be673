"""Stage 5 benchmark: translated sentences per second, batched beam search on a KV cache vs the naive one.

    python benchmarks/beam_search.py [--sentences 16] [--batched-sentences 200] [--device cuda]

One model and one set of source sentences for every search: a randomly initialised
`llmlab.models.transformer.Transformer` (d_model 256, 4 heads, 3 + 3 layers, d_ff 1024, vocabulary 8000, eval
mode) and sources of --min-len to --max-len tokens (default 8-25, uniform; random token ids). Searches, all
from llmlab/nn/decoding.py with beam 5, length penalty 0.6 and max output length 1.5·|x| + 10:
  - `beam_search_naive`: one sentence at a time, the whole prefix re-run through the model at every step,
    candidates ranked in Python: the textbook version, the baseline;
  - `beam_search`: every sentence of a batch (--batch-size sentences × 5 beams as the rows of one decoder
    call per step), KV caches, finished sentences leave the batch;
  - `greedy_search`: batched the same way, beam 1 (for scale: what beam 5 costs over greedy).
As a translation tool would, the batched searches take the sources sorted by length, in batches of
--batch-size. The naive search is measured on the first --sentences sources; the batched ones on those same
sources (the like-for-like ratio) and on --batched-sentences sources (full batches: their throughput in
use). Each repeat runs each batched search over its whole set and the naive one over the next slice of its
set (so it decodes every sentence exactly once, interleaved with the others); sentences/s is the median
over repeats (for the naive search also the overall figure, sentences / total time). The script then checks
that the batched beam search and the naive one return the same translation for every sentence of the
naive set and prints the result.

Random weights are the worst case for both searches, and the same for both: an untrained model almost never
ranks EOS among the best candidates, so every hypothesis runs to the length limit (EOS is forced there);
the script prints the mean output length next to the mean limit. A trained model stops at about the
reference length, which shortens both searches; the batched one also gains from sentences leaving the batch
at different steps. `--run RUN_DIR` measures that case: the trained model of a translation run (e.g.
`llmlab run multi30k-transformer --preset cpu`) with its decoding settings, on the run's real test sentences
(read from the data root, `--data-dir` or $LLMLAB_DATA). Prints the setup (command, machine, torch,
threads, date) and a markdown table; results go in docs/results.md with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from llmlab.models.transformer import Transformer, TransformerConfig
from llmlab.nn.decoding import (
    DecodeConfig,
    Hypothesis,
    beam_search,
    beam_search_naive,
    greedy_search,
    max_lengths,
)
from llmlab.train.record import hardware_info

PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 4  # ids below are special tokens


def make_sources(n: int, args: argparse.Namespace) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_len, args.max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(FIRST_WORD, args.vocab, (length,), generator=g) for length in lengths]


def batched(
    search: Callable[[Tensor], list[Hypothesis]], sources: list[Tensor], batch_size: int, device
) -> list[Hypothesis]:
    """Run a batched search over sources sorted by length, batch_size at a time; results in input order."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[Hypothesis | None] = [None] * len(sources)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src = nn.utils.rnn.pad_sequence([sources[i] for i in idx], batch_first=True, padding_value=PAD)
        for i, hyp in zip(idx, search(src.to(device)), strict=True):
            out[i] = hyp
    return out  # type: ignore[return-value]


def timed(fn: Callable[[], list[Hypothesis]], device: torch.device) -> tuple[float, list[Hypothesis]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3, help="encoder layers = decoder layers")
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batched decoding call")
    parser.add_argument("--sentences", type=int, default=16, help="sources for the naive search (slow)")
    parser.add_argument("--batched-sentences", type=int, default=200, help="sources for the batched ones")
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--run", default=None, help="a translation run: its model and real test sentences")
    parser.add_argument("--data-dir", default=None, help="with --run: the data root (default $LLMLAB_DATA)")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model, 2 sentences: seconds, to check it runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.d_ff, args.layers, args.vocab = 64, 128, 1, 500
        args.sentences, args.batched_sentences, args.repeats, args.min_len, args.max_len = 2, 16, 2, 3, 6
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TransformerConfig(
        d_model=args.d_model, n_heads=args.heads, encoder_layers=args.layers, decoder_layers=args.layers,
        d_ff=args.d_ff,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg, args.vocab, PAD).to(device).eval()
    dcfg = DecodeConfig(beam_size=args.beam, batch_size=args.batch_size)
    n_big = max(args.batched_sentences, args.sentences)
    sources = make_sources(n_big, args)
    described = "random-init Transformer"
    if args.run is not None:
        model, dcfg, sources, described = load_run(args, device, n_big)
        args.d_model, args.heads = model.cfg.d_model, model.cfg.n_heads
        args.layers, args.d_ff, args.vocab = model.cfg.encoder_layers, model.cfg.d_ff, model.vocab_size
        lengths = [len(s) for s in sources]
        args.min_len, args.max_len = min(lengths), max(lengths)
    small = sources[: args.sentences]

    hw = hardware_info()
    started = datetime.datetime.now().astimezone()
    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"machine: {hw['gpu'] or hw['cpu']} ({hw['cpu_count']} CPU cores, {torch.get_num_threads()} torch "
        f"threads), {platform.platform()}; python {platform.python_version()}, torch {torch.__version__}; "
        f"{started:%Y-%m-%d %H:%M %Z}"
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {described} d_model {args.d_model}, {args.heads} heads, "
        f"{args.layers}+{args.layers} layers, d_ff {args.d_ff}, vocab {args.vocab}, "
        f"{n_params / 1e6:.2f} M parameters, device {device}"
    )
    print(
        f"search: beam {dcfg.beam_size}, length penalty {dcfg.length_penalty}, max length "
        f"{dcfg.max_len_a}·|x| + {dcfg.max_len_b}, batch {dcfg.batch_size} sentences; sources "
        f"{args.min_len}-{args.max_len} tokens"
    )

    def beam(src: Tensor) -> list[Hypothesis]:
        return [hyps[0] for hyps in beam_search(model, src, BOS, EOS, dcfg)]

    def greedy(src: Tensor) -> list[Hypothesis]:
        return greedy_search(model, src, BOS, EOS, dcfg)

    batched(beam, sources[:4], dcfg.batch_size, device)  # warm-up
    batched(greedy, sources[:4], dcfg.batch_size, device)
    sets = {args.sentences: small, n_big: sources} if n_big != args.sentences else {n_big: sources}
    rates: dict[tuple[str, int], list[float]] = {}
    outputs: dict[str, list[Hypothesis]] = {}
    slices = [small[r :: args.repeats] for r in range(args.repeats)]  # naive: each sentence once
    naive_out: dict[int, Hypothesis] = {}
    naive_time = 0.0
    for r in range(args.repeats):  # interleaved, so that machine noise hits every search alike
        for n, srcs in sets.items():
            for name, search in (("beam_search (batched)", beam), ("greedy_search (batched)", greedy)):
                seconds, out = timed(lambda s=search, x=srcs: batched(s, x, dcfg.batch_size, device), device)
                rates.setdefault((name, n), []).append(len(srcs) / seconds)
                if n == args.sentences and name.startswith("beam"):
                    outputs["beam"] = out
        if not slices[r]:
            continue
        seconds, out = timed(
            lambda part=slices[r]: beam_search_naive(
                model, nn.utils.rnn.pad_sequence(part, batch_first=True, padding_value=PAD).to(device),
                BOS, EOS, dcfg,
            ),
            device,
        )  # fmt: skip
        naive_time += seconds
        rates.setdefault(("beam_search_naive", args.sentences), []).append(len(slices[r]) / seconds)
        for i, hyp in zip(range(r, args.sentences, args.repeats), out, strict=True):
            naive_out[i] = hyp

    print("\n| search | beam | sentences | sentences/s (median of repeats) | repeats (sentences/s) |")
    print("|---|---|---|---|---|")
    order = [("beam_search_naive", args.sentences)] + [
        (name, n) for n in sets for name in ("beam_search (batched)", "greedy_search (batched)")
    ]
    for name, n in order:
        values = rates[(name, n)]
        k = 1 if name.startswith("greedy") else args.beam
        runs = ", ".join(f"{v:.3g}" for v in values)
        print(f"| {name} | {k} | {n} | {statistics.median(values):.3g} | {runs} |")
    naive_rate = statistics.median(rates[("beam_search_naive", args.sentences)])
    fast_rate = statistics.median(rates[("beam_search (batched)", args.sentences)])
    print(
        f"\nbeam_search_naive overall: {args.sentences} sentences in {naive_time:.1f} s = "
        f"{args.sentences / naive_time:.3g} sentences/s"
    )
    speedup = fast_rate / naive_rate
    print(f"speed-up batched / naive beam search on the same {args.sentences} sentences: {speedup:.3g}x")
    big_beam = statistics.median(rates[("beam_search (batched)", n_big)])
    big_greedy = statistics.median(rates[("greedy_search (batched)", n_big)])
    print(f"greedy / beam {args.beam} throughput (batched, {n_big} sentences): {big_greedy / big_beam:.2f}x")

    fast = outputs["beam"]
    same = [i for i in range(args.sentences) if fast[i].tokens == naive_out[i].tokens]
    score_diff = max(abs(fast[i].score - naive_out[i].score) for i in range(args.sentences))
    verdict = "identical" if len(same) == args.sentences else "DIFFERENT"
    print(
        f"translations of beam_search vs beam_search_naive: {verdict} for {len(same)}/{args.sentences} "
        f"sentences (max |score difference| {score_diff:.1e})"
    )
    for i in sorted(set(range(args.sentences)) - set(same)):
        print(
            f"  sentence {i}: batched {fast[i].tokens} ({fast[i].score:.6f}) vs naive {naive_out[i].tokens} "
        )
    limits = max_lengths(
        nn.utils.rnn.pad_sequence(small, batch_first=True, padding_value=PAD), PAD, dcfg
    ).double()  # [N], EOS included
    out_len = statistics.fmean(len(h.tokens) + 1 for h in fast)
    print(
        f"output length (EOS included): mean {out_len:.1f} tokens; mean length limit {limits.mean():.1f} "
        + (
            "(a trained model stops near the reference length)"
            if args.run
            else "(random weights: to the limit)"
        )
    )


def load_run(args: argparse.Namespace, device: torch.device, n: int):
    """(model, decoding settings, the first n test sources as id tensors, a description) of a trained run."""
    from pathlib import Path

    from llmlab.recipes.base import BuildContext
    from llmlab.recipes.translation import Translator, encode_split, load_corpus

    translator = Translator.from_run(args.run, device=str(device))
    corpus = load_corpus(
        translator.cfg.data, BuildContext(device=device, data_dir=args.data_dir and Path(args.data_dir))
    )
    sources = corpus.splits["test"][0][:n]
    enc = encode_split(translator.tok, sources, [""] * len(sources))
    srcs = [enc.src[i, : int(enc.src_len[i])] for i in range(len(sources))]
    dcfg = DecodeConfig(
        **{**vars(translator.cfg.decode), "beam_size": args.beam, "batch_size": args.batch_size}
    )
    return translator.model, dcfg, srcs, f"the trained model of {args.run} (real test sentences)"


if __name__ == "__main__":
    main()
