"""Decoding an encoder-decoder model: greedy search and beam search, batched over sentences, on a KV cache.

A translation y = y_1 .. y_n (y_n = EOS) of a source x is scored by its log-probability under the model,
log p(y | x) = Σ_t log p(y_t | y_<t, x). Finding the best y exactly is intractable (|V|^n candidates), so:

- greedy search takes the most probable token at each step;
- beam search (as in Sutskever et al. 2014; the rules below follow fairseq's SequenceGenerator) keeps the K
  best prefixes ("beams"). At each step every beam is extended by every token, and the 2K best extensions by
  cumulative log-probability are taken: those that end in EOS and rank among the first K become finished
  hypotheses, the K best others continue. Taking 2K guarantees K continuing candidates even when up to K
  of them end in EOS (each beam has one EOS extension).
- length penalty (Wu et al. 2016, GNMT §7): a finished hypothesis of n tokens (EOS included) is ranked by
  log p(y | x) / lp(n), lp(n) = ((5 + n) / 6)^α. α = 0 is the raw log-probability, which favours short
  outputs (every token adds a negative term); the Transformer paper used beam 4 and α = 0.6.
- lengths: the model never emits PAD or BOS; a sentence's output has at most max_len tokens including EOS,
  max_len = min(⌊a·|x| + b⌋, cap) with |x| its source length in tokens: EOS is forced at the last position;
  and at least `min_len` tokens before EOS (fairseq's min_len, default 1: never an empty translation, which a
  beam with a length penalty can otherwise prefer when the model gives EOS-first a little probability).
- stopping: a sentence is done once it has K finished hypotheses (`early_stop=True`, fairseq's rule), or,
  with `early_stop=False`, once no live beam can beat its worst finished one. That bound is exact: a live
  beam's raw score s ≤ 0 can only fall, and s / lp(n') ≤ s / lp(max_len) for every n' ≤ max_len (α ≥ 0), so
  the search then returns the best-scoring sequence whenever the beam never had to drop a prefix — with
  K ≥ the number of candidates at every step it is exhaustive (tests/nn/test_decoding.py proves it against
  enumeration of every sequence).

The batched searches run all sentences (× K beams) as the rows of one decoder call per step, with the
decoder's KV caches (llmlab/nn/attention.py) so each step costs O(t) instead of re-running the prefix; a row
block leaves the batch as soon as its sentence is done (`DecoderState.reorder` drops it), so long sentences do
not make short ones pay. `beam_search_naive` is the textbook version of the same rules — one sentence at a
time, Python lists, the whole prefix recomputed each step — kept as the readable reference the tests compare
against and the baseline of benchmarks/beam_search.py.

The model interface: `encode(src) -> (memory, pad_mask)`, `start_decoding(memory, pad_mask) -> state`,
`decode_step(tokens [N], state) -> log-probs [N, V]`, `state.reorder(index)`, `forward(src, tgt_in)`, and
`pad_id` (llmlab.models.transformer.Transformer has them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DecodeConfig", "Hypothesis", "beam_search", "beam_search_naive", "greedy_search", "max_lengths"]


@dataclass
class DecodeConfig:
    """How translations are searched for (recorded with every BLEU figure)."""

    beam_size: int = 5
    length_penalty: float = 0.6  # α of GNMT's ((5 + n) / 6)^α; 0 = raw log-probability
    max_len_a: float = 1.5  # max output tokens = min(a · source tokens + b, max_len_cap)
    max_len_b: int = 10
    max_len_cap: int = 512
    early_stop: bool = True  # a sentence is done when it has beam_size finished hypotheses
    min_len: int = 1  # output tokens before EOS may come (the length limit still wins)
    batch_size: int = 64  # sentences per decoding batch

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.batch_size < 1 or self.max_len_cap < 1:
            raise ValueError("beam_size, batch_size and max_len_cap must be >= 1")
        if self.min_len < 0:
            raise ValueError("min_len must be >= 0")
        if self.length_penalty < 0 or self.max_len_a < 0 or self.max_len_b < 0:
            raise ValueError("length_penalty, max_len_a and max_len_b must be >= 0")
        if self.max_len_a == 0 and self.max_len_b == 0:
            raise ValueError("max_len_a and max_len_b cannot both be 0 (no output token would be allowed)")


@dataclass
class Hypothesis:
    tokens: list[int]  # the output, without BOS and EOS
    logprob: float  # log p(y | x), EOS included
    score: float  # logprob / lp(len(tokens) + 1): what the beam ranks by

    def __lt__(self, other: Hypothesis) -> bool:  # sorted(...) gives the worst first
        return self.score < other.score


def length_penalty(n: int | Tensor, alpha: float) -> float | Tensor:
    """GNMT's lp(n) = ((5 + n) / 6)^α for an output of n tokens (EOS included)."""
    return ((5 + n) / 6) ** alpha


def max_lengths(src: Tensor, pad_id: int, cfg: DecodeConfig) -> Tensor:
    """Per sentence, the most output tokens (EOS included): min(⌊a·|x| + b⌋, cap), at least 1. [B] int64."""
    src_len = src.ne(pad_id).sum(dim=1).double()  # [B]
    limit = torch.floor(cfg.max_len_a * src_len + cfg.max_len_b).long()  # [B]
    return limit.clamp(min=1, max=cfg.max_len_cap)


def _step_scores(logp: Tensor, t: int, limit: Tensor, bos: int, eos: int, pad: int, min_len: int) -> Tensor:
    """Mask what may not be generated at output position t + 1: PAD and BOS never; EOS before min_len
    tokens; anything but EOS at the last allowed position (limit [N])."""
    logp = logp.clone()
    logp[:, [pad, bos]] = float("-inf")
    if t < min_len:
        logp[:, eos] = float("-inf")
    last = (t + 1) >= limit  # [N]
    if last.any():
        eos_col = logp[last, eos].clone()
        logp[last] = float("-inf")
        logp[last, eos] = eos_col
    return logp


@torch.no_grad()
def greedy_search(model: nn.Module, src: Tensor, bos: int, eos: int, cfg: DecodeConfig) -> list[Hypothesis]:
    """The most probable token at each step, for every sentence of src [B, S] at once. Rows leave the batch
    when they emit EOS."""
    pad = model.pad_id
    limit = max_lengths(src, pad, cfg)  # [B]
    memory, pad_mask = model.encode(src)  # [B, S, d], [B, S]
    state = model.start_decoding(memory, pad_mask)
    alive = torch.arange(src.shape[0], device=src.device)  # sentence of each row
    tokens = torch.full_like(alive, bos)  # [N] the newest token of each row
    outputs: list[list[int]] = [[] for _ in range(src.shape[0])]
    logprobs = [0.0] * src.shape[0]
    for t in range(int(limit.max())):
        logp = _step_scores(
            model.decode_step(tokens, state), t, limit[alive], bos, eos, pad, cfg.min_len
        )  # [N, V]
        best, tokens = logp.max(dim=-1)  # [N], [N]
        for sent, tok, lp in zip(alive.tolist(), tokens.tolist(), best.tolist(), strict=True):
            outputs[sent].append(tok)
            logprobs[sent] += lp
        going = tokens.ne(eos)  # [N]
        if not going.all():
            keep = going.nonzero().squeeze(1)  # rows whose sentence goes on
            if keep.numel() == 0:
                break
            state.reorder(keep)
            alive, tokens = alive[keep], tokens[keep]
    return [
        Hypothesis(out[:-1] if out and out[-1] == eos else out, lp, lp)
        for out, lp in zip(outputs, logprobs, strict=True)
    ]


@torch.no_grad()
def beam_search(
    model: nn.Module, src: Tensor, bos: int, eos: int, cfg: DecodeConfig, nbest: int = 1
) -> list[list[Hypothesis]]:
    """Beam search over every sentence of src [B, S] at once (rows = sentence × beam). Returns, per sentence,
    its `nbest` best finished hypotheses, best first."""
    k, alpha, pad = cfg.beam_size, cfg.length_penalty, model.pad_id
    n_sent = src.shape[0]
    limit_all = max_lengths(src, pad, cfg)  # [B]
    memory, pad_mask = model.encode(src)  # [B, S, d], [B, S]
    state = model.start_decoding(
        memory.repeat_interleave(k, 0), pad_mask.repeat_interleave(k, 0)
    )  # [B·K, ...]
    sent_ids = torch.arange(n_sent, device=src.device)  # [n] sentences still decoding, in row-block order
    score_dtype = torch.promote_types(memory.dtype, torch.float32)  # fp32 at least, float64 in float64 models
    scores = torch.full(
        (n_sent, k), float("-inf"), dtype=score_dtype, device=src.device
    )  # [n, K] raw log-probs
    scores[:, 0] = 0.0  # one live beam to start with, so the K beams do not start as K copies
    seqs = torch.full((n_sent * k, 0), bos, dtype=torch.long, device=src.device)  # [n·K, t] tokens so far
    tokens = torch.full((n_sent * k,), bos, dtype=torch.long, device=src.device)  # [n·K]
    finished: list[list[Hypothesis]] = [[] for _ in range(n_sent)]
    lp_max = length_penalty(limit_all.double(), alpha)  # [B] the largest penalty a sentence can reach

    for t in range(int(limit_all.max())):
        n = sent_ids.numel()
        limit = limit_all[sent_ids].repeat_interleave(k)  # [n·K]
        logp = _step_scores(
            model.decode_step(tokens, state), t, limit, bos, eos, pad, cfg.min_len
        )  # [n·K, V]
        vocab = logp.shape[-1]
        cand = (scores.view(n * k, 1) + logp).view(n, k * vocab)  # [n, K·V] cumulative log-probs
        top, idx = cand.topk(min(2 * k, k * vocab), dim=-1)  # [n, 2K]
        beam, tok = idx // vocab, idx % vocab  # [n, 2K] parent beam and new token
        is_eos = tok.eq(eos) & top.isfinite()  # [n, 2K]

        # 1. EOS extensions that rank among the first K finish (as in fairseq).
        done = [False] * n
        for i, j in is_eos[:, :k].nonzero().tolist():
            sent = int(sent_ids[i])
            row = i * k + int(beam[i, j])
            length = t + 1  # tokens including this EOS
            raw = float(top[i, j])
            hyp = Hypothesis(seqs[row].tolist(), raw, raw / float(length_penalty(length, alpha)))
            _keep_best(finished[sent], hyp, k)

        # 2. The K best non-EOS extensions continue (ranked by raw score; -inf ones are dead beams).
        order = torch.where(is_eos, float("-inf"), top)  # [n, 2K]
        keep_top, keep_pos = order.topk(k, dim=-1)  # [n, K]
        new_scores = keep_top  # [n, K]
        parent = beam.gather(1, keep_pos)  # [n, K]
        new_tok = tok.gather(1, keep_pos)  # [n, K]

        # 3. Which sentences are done: K finished (early stop), no live beam left, or none can catch up.
        best_live = new_scores.max(dim=-1).values  # [n]
        for i in range(n):
            sent = int(sent_ids[i])
            fin = finished[sent]
            if not torch.isfinite(best_live[i]):
                done[i] = True
            elif len(fin) >= k:
                bound = float(best_live[i]) / float(lp_max[sent])
                done[i] = cfg.early_stop or bound <= fin[0].score
        going = torch.tensor([not d for d in done], device=src.device)
        if not going.any():
            break
        # 4. Reorder and shrink in one index: the kept sentences' row blocks, each beam from its parent row.
        keep_sent = going.nonzero().squeeze(1)  # [n']
        rows = (keep_sent[:, None] * k + parent[keep_sent]).reshape(-1)  # [n'·K] parent row of each new beam
        state.reorder(rows)
        seqs = torch.cat([seqs[rows], new_tok[keep_sent].reshape(-1, 1)], dim=1)  # [n'·K, t + 1]
        tokens = new_tok[keep_sent].reshape(-1)  # [n'·K]
        scores = new_scores[keep_sent]  # [n', K]
        sent_ids = sent_ids[keep_sent]
    # Forcing EOS at the last position means every sentence finishes; the fallback only guards the contract.
    return [
        sorted(f, reverse=True)[:nbest] or [Hypothesis([], float("-inf"), float("-inf"))] for f in finished
    ]


def _keep_best(finished: list[Hypothesis], hyp: Hypothesis, k: int) -> None:
    """Insert into a list kept sorted worst-first and capped at k."""
    if len(finished) < k:
        finished.append(hyp)
    elif hyp.score > finished[0].score:
        finished[0] = hyp
    else:
        return
    finished.sort()


@torch.no_grad()
def beam_search_naive(
    model: nn.Module, src: Tensor, bos: int, eos: int, cfg: DecodeConfig
) -> list[Hypothesis]:
    """The same search, written plainly: one sentence at a time, beams as Python lists, every step re-running
    the decoder over each beam's whole prefix (teacher-forcing `forward`, no cache). Slow; for reading, for
    the tests, and as the baseline of benchmarks/beam_search.py."""
    out = []
    pad = model.pad_id
    for s in range(src.shape[0]):
        x = src[s : s + 1]
        x = x[:, x[0].ne(pad)]  # [1, |x|]: this sentence alone, no padding
        limit = int(max_lengths(x, pad, cfg)[0])
        lp_max = length_penalty(limit, cfg.length_penalty)
        beams: list[tuple[float, list[int]]] = [(0.0, [])]  # (raw log-prob, tokens)
        finished: list[Hypothesis] = []
        for t in range(limit):
            prefixes = torch.tensor([[bos] + toks for _, toks in beams], device=src.device)  # [k, t + 1]
            logits = model(x.expand(len(beams), -1), prefixes)[:, -1]  # [k, V]
            limits = torch.full((len(beams),), limit, device=src.device)
            logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            logp = _step_scores(torch.log_softmax(logits, dim=-1), t, limits, bos, eos, pad, cfg.min_len)
            cands = [
                (score + float(logp[b, v]), b, v)
                for b, (score, _) in enumerate(beams)
                for v in range(logp.shape[1])
                if math.isfinite(float(logp[b, v]))
            ]
            # Ties broken as torch.topk over the flattened [beam, token] grid does: lower index first.
            cands.sort(key=lambda c: (-c[0], c[1] * logp.shape[1] + c[2]))
            cands = cands[: 2 * cfg.beam_size]
            for score, b, v in cands[: cfg.beam_size]:
                if v == eos:
                    hyp = Hypothesis(beams[b][1], score, score / length_penalty(t + 1, cfg.length_penalty))
                    _keep_best(finished, hyp, cfg.beam_size)
            beams = [(score, beams[b][1] + [v]) for score, b, v in cands if v != eos][: cfg.beam_size]
            if not beams:
                break
            if len(finished) >= cfg.beam_size:
                if cfg.early_stop or beams[0][0] / lp_max <= finished[0].score:
                    break
        out.append(max(finished))
    return out
