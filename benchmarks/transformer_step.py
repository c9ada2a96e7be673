"""Stage 5 benchmark: training-step time of our Transformer vs torch.nn.Transformer, same weights and batch.

    python benchmarks/transformer_step.py [--device cuda] [--tokens 3000] [--repeats 5]

Three models, each with its own AdamW: (a) `llmlab.models.transformer.Transformer` with fused attention
(F.scaled_dot_product_attention), (b) the same with naive attention (explicit softmax), (c) the torch twin:
`torch.nn.Transformer` (batch_first, post-norm, no final LayerNorms, like ours) plus a shared embedding scaled
by √d_model, the sinusoidal positions of §3.5, dropout on their sum, and a tied output projection. The twin is
built first and its weights are copied into ours (the mapping of tests/models/test_transformer.py, written
out here), so all three start from the same weights; the script prints the largest logit difference in eval
mode as a check. Default size: d_model 256, 4 heads, 3 + 3 layers, d_ff 1024, vocabulary 8000.

torch.nn.Transformer applies its one `dropout` to the sub-layer outputs, the attention probabilities and
between the two feed-forward layers, so ours is configured with dropout = attention_dropout =
activation_dropout (--dropout, 0.1) and every model runs in train mode: the same work on both sides. With
dropout on the attention probabilities, F.scaled_dot_product_attention cannot use the CPU flash kernel and
runs its "math" path, for our fused layers and torch's alike (the backend it picks is printed).

The batch: sentences with source and target lengths drawn uniformly from [--min-len, --max-len] (default
10-40, mean 25) until the targets hold --tokens tokens (default 3000), padded, random token ids; the loss is
cross-entropy over the real target tokens. A step is forward, loss, backward and AdamW step. The models are
timed in interleaved repeats (--steps steps each, after --warmup steps), so that machine noise hits all
alike; the figure is the median over repeats of the median step time. Goal: ours / torch <= 1.05. Prints the
setup (command, machine, torch, threads, date) and a markdown table; results go in docs/results.md with the
command, machine and date.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import shlex
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.models.transformer import Transformer, TransformerConfig
from llmlab.train.record import hardware_info

PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 4  # ids below are special tokens


class TorchTwin(nn.Module):
    """torch.nn.Transformer plus embeddings, positions and a tied output projection, as ours is built."""

    def __init__(self, cfg: TransformerConfig, vocab: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.d, self.p = d, cfg.dropout
        self.embed = nn.Embedding(vocab, d, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.core = nn.Transformer(
            d, cfg.n_heads, cfg.encoder_layers, cfg.decoder_layers, cfg.d_ff, dropout=cfg.dropout,
            activation=cfg.activation, batch_first=True, norm_first=cfg.norm_first,
        )  # fmt: skip
        if not cfg.use_final_norm:  # the published post-norm stacks end without an extra LayerNorm
            self.core.encoder.norm = None
            self.core.decoder.norm = None
        self.proj = nn.Linear(d, vocab, bias=False)
        self.proj.weight = self.embed.weight
        pos = torch.arange(1024, dtype=torch.float64)[:, None]  # §3.5, as The Annotated Transformer writes it
        div = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * -(math.log(10000.0) / d))
        pe = torch.zeros(1024, d, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe.float(), persistent=False)

    def _embed(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.d) + self.pe[: tokens.shape[1]]  # [B, n, d]
        return F.dropout(x, self.p, self.training)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        t = tgt_in.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=src.device)  # [T, T]
        pad = src.eq(PAD)  # [B, S]
        h = self.core(
            self._embed(src), self._embed(tgt_in), tgt_mask=causal, src_key_padding_mask=pad,
            memory_key_padding_mask=pad, tgt_is_causal=True,
        )  # fmt: skip
        return self.proj(h)  # [B, T, V]


def _copy_attention(ours: nn.Module, ref: nn.MultiheadAttention) -> None:
    for proj, w, b in zip(
        (ours.q_proj, ours.k_proj, ours.v_proj), ref.in_proj_weight.chunk(3), ref.in_proj_bias.chunk(3),
        strict=True,
    ):  # fmt: skip
        proj.weight.copy_(w)
        proj.bias.copy_(b)
    ours.out_proj.load_state_dict(ref.out_proj.state_dict())


@torch.no_grad()
def copy_from_torch(ours: Transformer, ref: TorchTwin) -> None:
    ours.src_embed.weight.copy_(ref.embed.weight)  # shared with tgt_embed and lm_head
    for mine, theirs in zip(ours.encoder.layers, ref.core.encoder.layers, strict=True):
        _copy_attention(mine.self_attn, theirs.self_attn)
        norms = (mine.self_attn_layer_norm, mine.final_layer_norm), (theirs.norm1, theirs.norm2)
        _copy_ffn_and_norms(mine, theirs, *norms)
    for mine, theirs in zip(ours.decoder.layers, ref.core.decoder.layers, strict=True):
        _copy_attention(mine.self_attn, theirs.self_attn)
        _copy_attention(mine.encoder_attn, theirs.multihead_attn)
        norms = (
            (mine.self_attn_layer_norm, mine.encoder_attn_layer_norm, mine.final_layer_norm),
            (theirs.norm1, theirs.norm2, theirs.norm3),
        )
        _copy_ffn_and_norms(mine, theirs, *norms)
    for mine, theirs in ((ours.encoder, ref.core.encoder), (ours.decoder, ref.core.decoder)):
        if mine.layer_norm is not None:
            mine.layer_norm.load_state_dict(theirs.norm.state_dict())


def _copy_ffn_and_norms(mine: nn.Module, theirs: nn.Module, my_norms: tuple, their_norms: tuple) -> None:
    mine.ffn.fc1.load_state_dict(theirs.linear1.state_dict())
    mine.ffn.fc2.load_state_dict(theirs.linear2.state_dict())
    for a, b in zip(my_norms, their_norms, strict=True):
        a.load_state_dict(b.state_dict())


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """src [B, S], tgt_in [B, T] (BOS + target[:-1]), tgt_out [B, T] (target, ending in EOS); PAD-padded."""
    g = torch.Generator().manual_seed(1)
    srcs, tgts = [], []
    while sum(len(t) for t in tgts) < args.tokens:
        s_len, t_len = torch.randint(args.min_len, args.max_len + 1, (2,), generator=g).tolist()
        srcs.append(torch.randint(FIRST_WORD, args.vocab, (s_len,), generator=g))
        tgts.append(
            torch.cat([torch.randint(FIRST_WORD, args.vocab, (t_len - 1,), generator=g), torch.tensor([EOS])])
        )
    src = nn.utils.rnn.pad_sequence(srcs, batch_first=True, padding_value=PAD)
    tgt_out = nn.utils.rnn.pad_sequence(tgts, batch_first=True, padding_value=PAD)
    tgt_in = nn.utils.rnn.pad_sequence(
        [torch.cat([torch.tensor([BOS]), t[:-1]]) for t in tgts], batch_first=True, padding_value=PAD
    )
    return src.to(device), tgt_in.to(device), tgt_out.to(device)


def time_steps(
    model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor, Tensor], steps: int
) -> float:
    """Median seconds per training step (forward, loss, backward, AdamW) over `steps` steps."""
    src, tgt_in, tgt_out = batch
    times = []
    for _ in range(steps):
        if src.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(src, tgt_in)  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if src.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sdpa_backend(q: Tensor, dropout: float) -> str:
    """Which kernel F.scaled_dot_product_attention picks (private API: informational, best effort)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = int(torch._fused_sdp_choice(q, q, q, dropout_p=dropout))
        return next(name for name, b in SDPBackend.__members__.items() if int(b) == choice)
    except Exception:  # informational only
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3, help="encoder layers = decoder layers")
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--tokens", type=int, default=3000, help="target tokens per batch (about)")
    parser.add_argument("--min-len", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and batch: seconds, to check it runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.d_ff, args.layers, args.vocab, args.tokens = 64, 128, 1, 1000, 300
        args.steps, args.warmup, args.repeats = 2, 1, 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask.*")
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor is True.*")
    device = torch.device(args.device)

    cfg = TransformerConfig(
        d_model=args.d_model, n_heads=args.heads, encoder_layers=args.layers, decoder_layers=args.layers,
        d_ff=args.d_ff, dropout=args.dropout, attention_dropout=args.dropout, activation_dropout=args.dropout,
        attention="fused",
    )  # fmt: skip
    torch.manual_seed(0)
    twin = TorchTwin(cfg, args.vocab).to(device)
    ours = Transformer(cfg, args.vocab, PAD).to(device)
    copy_from_torch(ours, twin)
    naive = copy.deepcopy(ours)
    naive.set_attention_impl("naive")
    models = {
        "llmlab (fused attention)": ours,
        "llmlab (naive attention)": naive,
        "torch.nn.Transformer": twin,
    }
    batch = make_batch(args, device)
    src, tgt_in, tgt_out = batch

    for m in models.values():
        m.eval()
    logits = {name: m(src, tgt_in).detach() for name, m in models.items()}  # with autograd: no fast paths
    real = tgt_out.ne(PAD)
    diff = max(
        (logits[n] - logits["torch.nn.Transformer"])[real].abs().max().item() for n in list(models)[:2]
    )

    hw = hardware_info()
    started = datetime.datetime.now().astimezone()
    n_params = sum(p.numel() for p in ours.parameters())
    dk = args.d_model // args.heads
    q = torch.zeros(src.shape[0], args.heads, src.shape[1], dk, device=device)
    print(f"command: python {shlex.join(sys.argv)}")
    print(
        f"machine: {hw['gpu'] or hw['cpu']} ({hw['cpu_count']} CPU cores, {torch.get_num_threads()} torch "
        f"threads), {platform.platform()}; python {platform.python_version()}, torch {torch.__version__}; "
        f"{started:%Y-%m-%d %H:%M %Z}"
    )
    print(
        f"model: d_model {args.d_model}, {args.heads} heads, {args.layers}+{args.layers} layers, "
        f"d_ff {args.d_ff}, vocab {args.vocab}, dropout {args.dropout} (also on attention and FFN), "
        f"post-norm, {n_params / 1e6:.2f} M parameters; device {device}"
    )
    print(
        f"batch: {src.shape[0]} sentences, {int(real.sum())} target tokens (padded {tuple(tgt_in.shape)}), "
        f"source {tuple(src.shape)}; sdpa backend in training: {sdpa_backend(q, args.dropout)} "
        f"(without dropout: {sdpa_backend(q, 0.0)})"
    )
    print(f"same weights: max |logits - torch's| over real target positions, eval mode: {diff:.2e}")

    for m in models.values():
        m.train()
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    for name, m in models.items():
        time_steps(m, opts[name], batch, args.warmup)
    results: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every model alike
        for name, m in models.items():
            results[name].append(time_steps(m, opts[name], batch, args.steps))

    tokens = int(real.sum())
    print("\n| model | step time (ms), median of repeats | repeats (ms) | target tokens/s |")
    print("|---|---|---|---|")
    for name, values in results.items():
        med = statistics.median(values)
        runs = ", ".join(f"{1000 * v:.1f}" for v in values)
        print(f"| {name} | {1000 * med:.1f} | {runs} | {tokens / med:.0f} |")
    med = {name: statistics.median(values) for name, values in results.items()}
    ratio = med["llmlab (fused attention)"] / med["torch.nn.Transformer"]
    print(f"\nratio llmlab (fused) / torch.nn.Transformer: {ratio:.3f} (goal <= 1.05)")
    print(
        f"ratio llmlab naive / fused attention: "
        f"{med['llmlab (naive attention)'] / med['llmlab (fused attention)']:.3f}"
    )


if __name__ == "__main__":
    main()
