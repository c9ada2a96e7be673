"""Corpus BLEU (Papineni et al. 2002) with sacreBLEU (Post 2018), from statistics that add up.

BLEU = BP · exp(Σ_n ¼ log p_n): p_n is the clipped n-gram precision of the whole corpus (n = 1..4) and BP the
brevity penalty, min(1, exp(1 - ref_len / hyp_len)). Both are functions of corpus-wide SUMS over sentences:
matched and total n-grams per order, hypothesis and reference lengths. So a corpus can be scored in pieces
— batch by batch, process by process — and the sums combined afterwards: the Trainer adds them like any other
statistic and all-reduces them across processes, and `bleu_from_stats` gives exactly what one call of
`sacrebleu.corpus_bleu` on all sentences gives (tests/train/test_bleu.py checks it). Scored on detokenised
text against the raw references with sacreBLEU's default 13a tokenisation, mixed case, exponential
smoothing; every reported BLEU names that setting with `bleu_signature()`.
"""

from __future__ import annotations

from collections.abc import Sequence

N_ORDER = 4
STAT_KEYS = (
    *(f"bleu_match{n}" for n in range(1, N_ORDER + 1)),
    *(f"bleu_total{n}" for n in range(1, N_ORDER + 1)),
    "bleu_hyp_len",
    "bleu_ref_len",
)

__all__ = ["STAT_KEYS", "bleu_from_stats", "bleu_signature", "bleu_stats", "corpus_bleu"]


def _metric():
    from sacrebleu.metrics import BLEU

    return BLEU()


def bleu_stats(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The additive statistics of `hypotheses` against one reference each (see the module docstring)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return dict.fromkeys(STAT_KEYS, 0.0)
    score = _metric().corpus_score(list(hypotheses), [list(references)])
    values = [*score.counts, *score.totals, score.sys_len, score.ref_len]
    return {k: float(v) for k, v in zip(STAT_KEYS, values, strict=True)}


def bleu_from_stats(stats: dict[str, float]) -> float:
    """BLEU (0-100) from summed statistics; 0 for an empty corpus."""
    from sacrebleu.metrics import BLEU

    if stats.get("bleu_hyp_len", 0) == 0:
        return 0.0
    counts = [int(round(stats[f"bleu_match{n}"])) for n in range(1, N_ORDER + 1)]
    totals = [int(round(stats[f"bleu_total{n}"])) for n in range(1, N_ORDER + 1)]
    score = BLEU.compute_bleu(
        counts,
        totals,
        int(round(stats["bleu_hyp_len"])),
        int(round(stats["bleu_ref_len"])),
        smooth_method="exp",
    )
    return float(score.score)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU's corpus BLEU of detokenised hypotheses against raw references, in one call."""
    return float(_metric().corpus_score(list(hypotheses), [list(references)]).score)


def bleu_signature() -> str:
    """e.g. nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"""
    metric = _metric()
    metric.corpus_score(["a"], [["a"]])  # the signature names the reference count once it has seen one
    return str(metric.get_signature())
