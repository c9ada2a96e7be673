"""TensorLoader: seeded epochs, resumable positions, and per-process shares of the global batch."""

from __future__ import annotations

import pytest
import torch

from llmlab.data.loader import TensorLoader


def _data(n=10):
    return torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n)


def test_epoch_covers_every_sample_once_and_is_seeded():
    loader = TensorLoader(_data(10), batch_size=4, shuffle=True, seed=3)
    assert len(loader) == 3
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == list(range(10))
    again = torch.cat([y for _, y in TensorLoader(_data(10), batch_size=4, shuffle=True, seed=3)])
    assert torch.equal(seen, again)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in loader]), seen)


def test_drop_last_and_eval_order():
    assert len(TensorLoader(_data(10), 4, shuffle=True, drop_last=True)) == 2
    ordered = TensorLoader(_data(10), 4)
    assert torch.equal(torch.cat([y for _, y in ordered]), torch.arange(10))


def test_iter_from_resumes_mid_epoch():
    loader = TensorLoader(_data(20), 3, shuffle=True, seed=1)
    loader.set_epoch(2)
    full = [y for _, y in loader]
    assert all(torch.equal(a, b) for a, b in zip([y for _, y in loader.iter_from(4)], full[4:], strict=True))


def _shift(batch, g):
    x, y = batch
    return x + torch.rand(x.shape, generator=g), y


@pytest.mark.parametrize("transform", [None, _shift])
def test_process_shares_add_up_to_the_single_process_batch(transform):
    single = TensorLoader(_data(24), 8, shuffle=True, drop_last=True, seed=5, transform=transform)
    shares = [
        TensorLoader(
            _data(24), 8, shuffle=True, drop_last=True, seed=5, rank=r, world_size=2, transform=transform
        )
        for r in (0, 1)
    ]
    for whole, a, b in zip(single, *shares, strict=True):
        assert torch.equal(whole[0], torch.cat([a[0], b[0]]))
        assert torch.equal(whole[1], torch.cat([a[1], b[1]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        TensorLoader(_data(8), 3, shuffle=True, world_size=2)
    with pytest.raises(ValueError, match="same first dimension"):
        TensorLoader((torch.zeros(3), torch.zeros(4)), 2)
    with pytest.raises(ValueError, match="empty"):
        TensorLoader((torch.zeros(0),), 2)
