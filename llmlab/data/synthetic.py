"""Seeded synthetic classification data for `smoke` presets: tests train on it in seconds, with no files.

The generative model is a Gaussian mixture with one component per class: class c has a fixed prototype
mu_c ~ N(0, I) (drawn from `seed`) and a sample is x = mu_c + noise * N(0, I). The Bayes-optimal classifier is
linear, so a logistic regression or an MLP learns it quickly; larger `noise` makes it harder.

Splits: the prototypes depend on `seed` only; the samples depend on (`seed`, `split`). So
`synthetic_classification(..., seed=s, split="train")` and `(..., seed=s, split="test")` are two independent
samples of the SAME task, and a model trained on the first generalises to the second.
"""

from __future__ import annotations

import torch

# Fixed per-split offsets for the sample stream; prototypes use the bare seed.
_SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def synthetic_classification(
    n: int,
    shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    noise: float = 1.0,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` samples of a `num_classes`-way Gaussian mixture: (features float32 [n, *shape], labels int64 [n]).

    Deterministic in all arguments. Classes are balanced (counts differ by at most one) and shuffled.
    `split` is one of "train", "val", "test": same task (prototypes), independent samples.
    """
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
    if n < 0 or num_classes < 1:
        raise ValueError(f"need n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    shape = tuple(shape)
    prototypes = torch.randn((num_classes, *shape), generator=_generator(seed))  # [C, *shape]
    # A distinct, reproducible stream per (seed, split); the large odd multiplier keeps nearby seeds apart.
    g = _generator((seed * 1_000_003 + _SPLIT_STREAMS[split]) % (2**63))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]  # [n], balanced then shuffled
    x = prototypes[labels] + noise * torch.randn((n, *shape), generator=g)  # [n, *shape]
    return x.float(), labels.long()
