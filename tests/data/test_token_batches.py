"""llmlab.data.token_batches: batches by token count, every pair once per epoch, the same shapes every epoch
(so len() is exact), process shares and row multiples, exact resume, and far less padding than random
batches."""

from __future__ import annotations

import torch

from llmlab.data.token_batches import TokenBatchLoader, padded_slots, plan_token_batches

PAD = 0


def _pairs(n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src_len = torch.randint(2, 30, (n,), generator=g)
    tgt_len = (src_len + torch.randint(-2, 5, (n,), generator=g)).clamp(min=3)
    src = torch.zeros(n, int(src_len.max()), dtype=torch.long)
    tgt = torch.zeros(n, int(tgt_len.max()), dtype=torch.long)
    for i in range(n):
        src[i, : src_len[i]] = torch.randint(4, 50, (int(src_len[i]),), generator=g)
        tgt[i, : tgt_len[i]] = torch.randint(4, 50, (int(tgt_len[i]),), generator=g)
    return src, tgt, src_len, tgt_len


def test_every_pair_once_and_within_the_budget():
    src, tgt, sl, tl = _pairs()
    for shuffle in (True, False):
        batches = plan_token_batches(sl, tl, 200, shuffle=shuffle, seed=3, epoch=1)
        rows = torch.cat(batches).sort().values
        assert torch.equal(rows, torch.arange(len(sl)))
        for b in batches:
            width = int(torch.maximum(sl[b], tl[b]).max())
            assert len(b) * width <= 200 or len(b) == 1


def test_same_shapes_every_epoch_different_membership_and_order():
    _, _, sl, tl = _pairs()
    plans = [plan_token_batches(sl, tl, 250, shuffle=True, seed=0, epoch=e) for e in range(3)]
    assert len({len(p) for p in plans}) == 1
    shapes = [sorted((len(b), int(torch.maximum(sl[b], tl[b]).max())) for b in p) for p in plans]
    assert shapes[0] == shapes[1] == shapes[2]
    assert [b.tolist() for b in plans[0]] != [b.tolist() for b in plans[1]]
    # Deterministic from (seed, epoch).
    again = plan_token_batches(sl, tl, 250, shuffle=True, seed=0, epoch=1)
    assert [b.tolist() for b in again] == [b.tolist() for b in plans[1]]


def test_row_multiple_in_training_and_nothing_dropped_in_evaluation():
    _, _, sl, tl = _pairs(301)
    train = plan_token_batches(sl, tl, 150, shuffle=True, row_multiple=4)
    assert all(len(b) % 4 == 0 for b in train)
    assert len(sl) - sum(len(b) for b in train) < 4 * len(train)  # only small remainders sit out
    evaluation = plan_token_batches(sl, tl, 150, shuffle=False, row_multiple=4)
    assert sum(len(b) for b in evaluation) == 301


def test_bucketing_saves_most_of_the_padding():
    _, _, sl, tl = _pairs(2000)
    bucketed = plan_token_batches(sl, tl, 400, shuffle=True)
    random_batches = list(torch.randperm(2000).split(max(1, 2000 // len(bucketed))))
    real, slots = padded_slots(sl, tl, bucketed)
    real_r, slots_r = padded_slots(sl, tl, random_batches)
    assert 1 - real / slots < 0.1 < 1 - real_r / slots_r


def test_loader_trims_splits_across_processes_and_resumes():
    src, tgt, sl, tl = _pairs()
    one = TokenBatchLoader(src, tgt, sl, tl, 300, shuffle=True, seed=1, row_multiple=2)
    shares = [
        TokenBatchLoader(src, tgt, sl, tl, 300, shuffle=True, seed=1, rank=r, world_size=2, row_multiple=2)
        for r in range(2)
    ]
    assert len(one) == len(shares[0]) == len(shares[1])
    one.set_epoch(2)
    for s in shares:
        s.set_epoch(2)
    for (s, t, ids), (s0, t0, i0), (s1, t1, i1) in zip(one, *shares, strict=True):
        assert s.shape[1] == int(sl[ids].max()) and t.shape[1] == int(tl[ids].max())  # trimmed
        assert torch.equal(torch.cat([i0, i1]), ids)
        assert torch.equal(torch.cat([s0, s1]), s) and torch.equal(torch.cat([t0, t1]), t)
        assert torch.equal(s, src[ids, : s.shape[1]])
    full = [ids.tolist() for _, _, ids in one]
    assert [ids.tolist() for _, _, ids in one.iter_from(3)] == full[3:]


def test_bad_arguments():
    src, tgt, sl, tl = _pairs(10)
    import pytest

    with pytest.raises(ValueError, match="max_tokens"):
        TokenBatchLoader(src, tgt, sl, tl, 0)
    with pytest.raises(ValueError, match="world_size"):
        TokenBatchLoader(src, tgt, sl, tl, 100, shuffle=True, world_size=2, row_multiple=3)
    with pytest.raises(ValueError, match="first dimension"):
        TokenBatchLoader(src, tgt[:5], sl, tl, 100)
