"""BLEU from additive statistics (llmlab.train.bleu) equals one sacrebleu.corpus_bleu call over the whole
corpus, whatever the split into pieces: exactly (the same integer counts go into the same formula)."""

from __future__ import annotations

import random

import sacrebleu

from llmlab.train.bleu import STAT_KEYS, bleu_from_stats, bleu_signature, bleu_stats, corpus_bleu

WORDS = "a man dog runs on the green grass near two women in red hats , .".split()


def _corpus(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    refs = [" ".join(rng.choices(WORDS, k=rng.randint(3, 15))) for _ in range(n)]
    hyps = [
        " ".join(w if rng.random() < 0.7 else rng.choice(WORDS) for w in r.split()[: rng.randint(1, 15)])
        for r in refs
    ]
    return hyps, refs


def test_summed_statistics_give_sacrebleus_corpus_score():
    hyps, refs = _corpus(200, 0)
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert corpus_bleu(hyps, refs) == expected
    assert bleu_from_stats(bleu_stats(hyps, refs)) == expected
    total = dict.fromkeys(STAT_KEYS, 0.0)
    for start in range(0, 200, 37):  # uneven pieces, as batches and processes give
        for k, v in bleu_stats(hyps[start : start + 37], refs[start : start + 37]).items():
            total[k] += v
    assert bleu_from_stats(total) == expected
    assert 5 < expected < 95  # a corpus where the comparison can fail


def test_edge_cases_and_signature():
    assert bleu_from_stats(bleu_stats([], [])) == 0.0
    assert abs(corpus_bleu(["the cat sat on the mat ."], ["the cat sat on the mat ."]) - 100.0) < 1e-9
    sig = bleu_signature()
    assert sig.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
