"""BucketLoader: every sample once per epoch, trimmed and length-sorted batches, exact resume, process shares,
seeding; and the padding it saves."""

from __future__ import annotations

import pytest
import torch

from llmlab.data.bucket import BucketLoader, padding_fraction, padding_report, plan_batches
from llmlab.data.loader import TensorLoader

T = 60


def _data(n: int = 1000, seed: int = 0):
    """tokens [n, T] (row i: i+1 in its first lengths[i] slots, 0 after), lengths [n], labels [n]."""
    g = torch.Generator().manual_seed(seed)
    # Skewed like review lengths: many short, a few long (some at the cap T).
    lengths = (torch.rand(n, generator=g) ** 2 * (T + 10)).long().clamp(1, T)
    tokens = torch.zeros(n, T, dtype=torch.int64)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    tokens[mask] = (torch.arange(n)[:, None] + 1).expand(n, T)[mask]
    return tokens, lengths, torch.arange(n)


def _epoch(loader, start: int = 0):
    return list(loader.iter_from(start))


@pytest.mark.parametrize("n, bs", [(1000, 32), (999, 32), (64, 32), (10, 32)])
def test_every_sample_once_and_batches_trimmed_and_sorted(n, bs):
    tokens, lengths, labels = _data(n)
    loader = BucketLoader((tokens, lengths, labels), bs, shuffle=True, seed=3, bucket_batches=4)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == -(-n // bs)
    seen = torch.cat([y for _, _, y in batches])
    assert sorted(seen.tolist()) == list(range(n))
    assert all(len(y) == bs for _, _, y in batches[:-1])
    for x, lens, y in batches:
        assert x.shape == (len(y), int(lens.max()))  # trimmed to the batch's longest sequence
        assert torch.equal(lens, lengths[y]) and torch.equal(x, tokens[y, : x.shape[1]])
        assert torch.all(lens[:-1] >= lens[1:])  # longest first: ready for pack_padded_sequence


def test_bucketing_cuts_padding_well_below_random_batches():
    tokens, lengths, labels = _data(2000)
    loader = BucketLoader((tokens, lengths, labels), 32, shuffle=True, bucket_batches=10)
    bucketed = padding_fraction(lengths, loader.batch_indices())
    random = padding_fraction(lengths, [y for _, y in TensorLoader((lengths, labels), 32, shuffle=True)])
    assert bucketed < 0.25 * random
    # what the loader yields is what batch_indices() describes
    slots = sum(x.numel() for x, _, _ in loader)
    assert 1 - int(lengths.sum()) / slots == pytest.approx(bucketed)
    report = padding_report(lengths, 32, bucket_batches=10, width=T)
    assert report["sorted"] <= report["bucketed"] < report["random_trimmed"] <= report["fixed"]
    assert report["bucketed"] == pytest.approx(bucketed)
    assert report["fixed"] == pytest.approx(1 - lengths.float().mean().item() / T)


def test_iter_from_is_the_tail_of_the_epoch():
    loader = BucketLoader(_data(500), 16, shuffle=True, seed=1, bucket_batches=3)
    loader.set_epoch(2)
    full = _epoch(loader)
    for k in (0, 5, len(full) - 1, len(full)):
        tail = _epoch(loader, k)
        assert len(tail) == len(full) - k
        for got, want in zip(tail, full[k:], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("world_size", [2, 4])
def test_process_shares_concatenate_to_the_global_batch(world_size):
    data = _data(300)
    single = BucketLoader(data, 16, shuffle=True, seed=5, bucket_batches=4)
    shares = [
        BucketLoader(data, 16, shuffle=True, seed=5, rank=r, world_size=world_size, bucket_batches=4)
        for r in range(world_size)
    ]
    for loader in (single, *shares):
        loader.set_epoch(1)
    for whole, *parts in zip(single, *shares, strict=True):
        for i in range(3):
            assert torch.equal(whole[i], torch.cat([p[i] for p in parts]))


def test_seeded_per_epoch_and_global_rng_untouched():
    data = _data(400)
    rng = torch.get_rng_state()

    def labels(seed, epoch):
        loader = BucketLoader(data, 20, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([y for _, _, y in loader])

    assert torch.equal(labels(0, 0), labels(0, 0))
    assert not torch.equal(labels(0, 0), labels(0, 1))
    assert not torch.equal(labels(0, 0), labels(1, 0))
    assert torch.equal(torch.get_rng_state(), rng)


def test_drop_last_drops_what_tensor_loader_drops():
    tokens, lengths, labels = _data(110)
    bucket = BucketLoader((tokens, lengths, labels), 16, shuffle=True, drop_last=True, seed=7)
    plain = TensorLoader((lengths, labels), 16, shuffle=True, drop_last=True, seed=7)
    for epoch in (0, 3):
        bucket.set_epoch(epoch)
        plain.set_epoch(epoch)
        got = [y for _, _, y in bucket]
        assert len(got) == len(bucket) == 6 and all(len(y) == 16 for y in got)
        assert set(torch.cat(got).tolist()) == set(torch.cat([y for _, y in plain]).tolist())


def test_evaluation_order_is_sorted_by_length():
    tokens, lengths, labels = _data(100)
    loader = BucketLoader((tokens, lengths, labels), 32)
    batches = list(loader)
    assert [len(y) for _, _, y in batches] == [32, 32, 32, 4]
    order = torch.cat([y for _, _, y in batches])
    assert sorted(order.tolist()) == list(range(100))
    assert torch.all(lengths[order][:-1] >= lengths[order][1:])
    ties = lengths[order] == lengths[order][0]  # ties keep dataset order
    assert torch.all(order[ties][:-1] < order[ties][1:])
    assert torch.equal(order, torch.cat(loader.batch_indices()))
    # drop_last leaves out the dataset's tail, as TensorLoader does
    dropped = BucketLoader((tokens, lengths, labels), 32, drop_last=True)
    assert sorted(torch.cat([y for _, _, y in dropped]).tolist()) == list(range(96))


def test_plan_without_data_and_bad_arguments():
    lengths = torch.tensor([3, 1, 2, 5, 4])
    assert [b.tolist() for b in plan_batches(lengths, 2, shuffle=False)] == [[3, 4], [0, 2], [1]]
    assert plan_batches(lengths, 8, shuffle=True, drop_last=True) == []
    tokens = torch.zeros(5, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="divisible"):
        BucketLoader((tokens, lengths), 3, shuffle=True, world_size=2)
    with pytest.raises(ValueError, match="same first dimension"):
        BucketLoader((tokens, lengths[:4]), 2)
    with pytest.raises(ValueError, match="lengths must lie"):
        BucketLoader((tokens, lengths + 1), 2)
    with pytest.raises(ValueError, match="at least"):
        BucketLoader((tokens,), 2)
    with pytest.raises(ValueError, match="empty"):
        BucketLoader((tokens[:0], lengths[:0]), 2)
    # all-empty sequences still give one column, so an embedding + RNN can run
    x, _ = next(iter(BucketLoader((tokens, torch.zeros(5, dtype=torch.int64)), 2)))
    assert x.shape == (2, 1)
