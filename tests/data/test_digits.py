"""scikit-learn's bundled digits: shapes, range, a stratified and deterministic split."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from llmlab.data import dataset_status
from llmlab.data.digits import load_digits_splits


def test_shapes_dtypes_range():
    data = load_digits_splits()
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    assert x_tr.shape == (1437, 8, 8) and x_te.shape == (360, 8, 8)
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    for x in (x_tr, x_te):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y_tr.tolist()) == set(range(10)) == set(y_te.tolist())


def test_split_is_stratified_and_disjoint():
    data = load_digits_splits()
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    total = torch.bincount(torch.cat([y_tr, y_te]), minlength=10)
    test = torch.bincount(y_te, minlength=10)
    assert total.sum() == 1797
    assert torch.all((test.float() - 0.2 * total.float()).abs() <= 1.0)
    # train + test is a partition of the bundled set: same (image, label) multiset, nothing lost or repeated
    bunch = load_digits()
    split_rows = sorted(
        (int(label), *row)
        for x, y in ((x_tr, y_tr), (x_te, y_te))
        for row, label in zip((x.reshape(-1, 64) * 16).round().int().tolist(), y.tolist(), strict=True)
    )
    full_rows = sorted((int(t), *map(int, d)) for d, t in zip(bunch.data, bunch.target, strict=True))
    assert split_rows == full_rows


def test_deterministic_and_seeded():
    a, b = load_digits_splits(), load_digits_splits()
    for split in ("train", "test"):
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
    c = load_digits_splits(seed=1)
    assert not torch.equal(a["test"][1], c["test"][1])
    assert load_digits_splits(test_fraction=0.5)["test"][0].shape[0] == 899


def test_status_is_bundled():
    assert dataset_status("digits").state == "bundled"
