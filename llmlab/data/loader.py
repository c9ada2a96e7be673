"""Batches of in-memory tensors: seeded shuffling, a process's share of each global batch, exact resume.

Small datasets (MNIST, CIFAR-10 as uint8, tokenised text) fit in memory, even on the GPU, so batches are
gathered by index instead of through a DataLoader's worker processes. The order of epoch `e` is a permutation
drawn from `seed + e`, and batch transforms (augmentation) draw from a generator seeded by (seed, epoch,
batch), so any batch can be rebuilt from (epoch, index) alone: that is what makes resume bit-exact.

Under data parallelism each global batch of `batch_size` samples is split into `world_size` contiguous
shares, so N processes see exactly the samples one process would. The transform runs on the whole global
batch before the split (it is cheap next to a training step), so augmented runs match too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

Batch = tuple[torch.Tensor, ...]
Transform = Callable[[Batch, torch.Generator], Batch]


class TensorLoader:
    def __init__(
        self,
        tensors: Batch,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: Transform | None = None,
    ) -> None:
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors need the same first dimension")
        if shuffle and batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
        if n == 0:
            raise ValueError("empty dataset")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return self.tensors[0].shape[0]

    def __len__(self) -> int:
        """Global batches per epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def iter_from(self, start: int) -> Iterator[Batch]:
        """Batches `start, start+1, ...` of the current epoch (this process's share of each)."""
        order = self._order()
        for b in range(start, len(self)):
            global_idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            device = self.tensors[0].device
            if self.transform is None:
                idx = torch.tensor_split(global_idx, self.world_size)[self.rank].to(device)
                yield tuple(t[idx] for t in self.tensors)
                continue
            batch = tuple(t[global_idx.to(device)] for t in self.tensors)
            g = torch.Generator(device=device)
            g.manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + b)
            batch = self.transform(batch, g)
            yield tuple(torch.tensor_split(t, self.world_size)[self.rank] for t in batch)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)
