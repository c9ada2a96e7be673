"""Length-bucketed batches of padded sequences: less padding, the same loader protocol as TensorLoader.

Random batches of IMDB reviews mix a 50-token review with a 400-token one, so most of an RNN's work is on
padding. Bucketing (as in torchtext's `BucketIterator` and fairseq's length-sorted batching) sorts samples of
similar length together, while keeping enough randomness for SGD: per epoch,
1. shuffle all samples (a permutation drawn from (seed, epoch), like TensorLoader's);
2. cut that order into chunks of `bucket_batches * batch_size` samples;
3. sort each chunk by length, longest first (stable: ties keep the shuffled order), and cut it into batches,
   so each batch is also ready for `pack_padded_sequence(..., enforce_sorted=True)`;
4. shuffle the order of the full batches (the one partial batch, if any, stays last, as in TensorLoader);
5. trim each batch to its longest sequence: `tokens[:, :max(lengths)]`.
Every sample appears exactly once per epoch; `drop_last` drops the same samples TensorLoader would (the tail
of the epoch's permutation, before sorting), so no length is favoured. Any batch can be rebuilt from (seed,
epoch, index), which gives exact resume (`iter_from`).

`shuffle=False` (evaluation) sorts the whole set by length, longest first (ties in dataset order), and cuts it
into consecutive batches: the least padding possible, and a fixed order; `batch_indices()` maps the batches
back to dataset rows. Under data parallelism each global batch (already trimmed to its longest sequence, so
every rank gets the same width) is split into `world_size` contiguous shares with `torch.tensor_split`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from llmlab.data.loader import Batch, TensorLoader


class BucketLoader(TensorLoader):
    """Batches of `(tokens [B, T_batch], lengths [B], *others)` from `tensors = (tokens [N, T], lengths [N],
    labels [N], ...)`, with `T_batch` = the longest length in the global batch (at least 1). TensorLoader's
    protocol (len, set_epoch, iter_from, the split into process shares); only the batch order differs."""

    def __init__(
        self,
        tensors: Batch,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        bucket_batches: int = 50,
    ) -> None:
        if len(tensors) < 2:
            raise ValueError("BucketLoader needs at least (tokens [N, T], lengths [N])")
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError(
                f"batch_size and bucket_batches must be >= 1, got {batch_size}, {bucket_batches}"
            )
        super().__init__(tensors, batch_size, shuffle, drop_last, seed, rank, world_size)
        tokens, lengths = tensors[0], tensors[1]
        if tokens.ndim != 2 or lengths.ndim != 1:
            raise ValueError(
                f"expected tokens [N, T] and lengths [N], got {tuple(tokens.shape)} and "
                f"{tuple(lengths.shape)}"
            )
        lengths_cpu = lengths.detach().to("cpu", torch.int64)
        if int(lengths_cpu.min()) < 0 or int(lengths_cpu.max()) > tokens.shape[1]:
            raise ValueError(f"lengths must lie in [0, {tokens.shape[1]}] (the width of tokens)")
        self.bucket_batches = bucket_batches
        self._lengths = lengths_cpu  # planning happens on the CPU, whatever device the data is on

    def batch_indices(self) -> list[torch.Tensor]:
        """The dataset rows of every global batch of the current epoch, in order (int64 CPU tensors)."""
        return plan_batches(
            self._lengths,
            self.batch_size,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            seed=self.seed,
            epoch=self.epoch,
            bucket_batches=self.bucket_batches,
        )

    def iter_from(self, start: int) -> Iterator[Batch]:
        """Batches `start, start+1, ...` of the current epoch (this process's share of each)."""
        device = self.tensors[0].device
        for global_idx in self.batch_indices()[start:]:
            width = max(1, int(self._lengths[global_idx].max()))
            idx = torch.tensor_split(global_idx, self.world_size)[self.rank].to(device)
            # [N, T] -> [B_share, width]; (x[idx, :w] would take a slow generic indexing path)
            tokens = self.tensors[0][:, :width].index_select(0, idx)
            yield (tokens, *(t[idx] for t in self.tensors[1:]))


def plan_batches(
    lengths: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    epoch: int = 0,
    bucket_batches: int = 50,
) -> list[torch.Tensor]:
    """The global batches (rows of `lengths`, int64 CPU tensors) of one epoch, as the module docstring
    describes: bucketed and shuffled when `shuffle`, else the whole set sorted by length."""
    lengths = lengths.to("cpu", torch.int64)
    n = len(lengths)
    n_used = (n // batch_size) * batch_size if drop_last else n
    if not shuffle:
        return list(torch.split(_by_length(lengths, torch.arange(n)[:n_used]), batch_size))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)[:n_used]  # drop_last: the permutation's tail, as TensorLoader
    chunk = bucket_batches * batch_size
    batches: list[torch.Tensor] = []
    for start in range(0, n_used, chunk):
        batches += torch.split(_by_length(lengths, perm[start : start + chunk]), batch_size)
    if not batches:
        return []
    # Only the last chunk can end in a partial batch; it stays last, the full ones are shuffled.
    partial = batches.pop() if len(batches[-1]) < batch_size else None
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches + ([partial] if partial is not None else [])


def _by_length(lengths: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`idx` sorted by `lengths[idx]`, longest first; stable, so ties keep their order in `idx`."""
    order = torch.sort(lengths[idx], descending=True, stable=True).indices
    return idx[order]


# ---------------------------------------------------------------------------------------------------------
# How much padding bucketing saves
# ---------------------------------------------------------------------------------------------------------


def padding_fraction(
    lengths: torch.Tensor, batches: Iterable[torch.Tensor], width: int | None = None
) -> float:
    """Share of the token slots that are padding, over `batches` (rows of `lengths`) each trimmed to its
    longest sequence, or all padded to `width` when given (fixed-width [B, T] batches)."""
    lengths = lengths.to("cpu", torch.int64)
    real = slots = 0
    for idx in batches:
        lens = lengths[idx]
        real += int(lens.sum())
        slots += len(idx) * (width if width is not None else max(1, int(lens.max())))
    return 1 - real / slots if slots else 0.0


def padding_report(
    lengths: torch.Tensor,
    batch_size: int,
    bucket_batches: int = 50,
    seed: int = 0,
    epoch: int = 0,
    width: int | None = None,
) -> dict[str, float]:
    """Padding fractions for one training epoch of `lengths` (e.g. encoded IMDB reviews, max_len 400):

    - `fixed`: random batches padded to `width` (default: the longest length), i.e. TensorLoader on [N, T];
    - `random_trimmed`: random batches each trimmed to their longest sequence;
    - `bucketed`: BucketLoader's batches (trimmed), with `bucket_batches`;
    - `sorted`: the whole set sorted by length (the evaluation order, the floor for any batching).
    """
    lengths = lengths.to("cpu", torch.int64)
    width = width if width is not None else max(1, int(lengths.max()))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    random_batches = list(torch.split(torch.randperm(len(lengths), generator=g), batch_size))
    bucketed = plan_batches(lengths, batch_size, seed=seed, epoch=epoch, bucket_batches=bucket_batches)
    return {
        "fixed": padding_fraction(lengths, random_batches, width),
        "random_trimmed": padding_fraction(lengths, random_batches),
        "bucketed": padding_fraction(lengths, bucketed),
        "sorted": padding_fraction(lengths, plan_batches(lengths, batch_size, shuffle=False)),
    }
