"""Batches of sentence pairs by token count (fairseq's `--max-tokens`), with length bucketing.

Translation sentences range from 3 to 60+ tokens, so a fixed number of sentences per batch either wastes
memory on short batches or overflows on long ones, and random batches spend much of their compute on padding.
As fairseq does (LanguagePairDataset.ordered_indices + batch_by_size + a shuffled batch order):

1. sort all pairs by (target length, source length), ties broken by a permutation drawn from (seed, epoch);
2. cut that order into batches greedily: a batch takes pairs while rows × max(longest source, longest target)
   stays within `max_tokens` (a single pair longer than the budget gets a batch of its own);
3. shuffle the order of the batches with (seed, epoch).

The lengths' sorted sequence is the same every epoch (only which equal-length pairs share a batch changes),
so every epoch has the same number of batches of the same shapes: `len()` is exact and a run's schedule and
resume position are well defined; any batch can be rebuilt from (seed, epoch, index) for bit-exact resume.
`row_multiple` (processes × micro-batches) makes every batch's row count a multiple of it, so each process and
micro-batch gets an equal share; the few pairs left over at the end (< row_multiple) sit out that epoch.
Without `shuffle` (evaluation) nothing is dropped and batches come in length order.

Each batch is trimmed to its longest source and target: (src [B, S_b], tgt [B, T_b], ids [B]), where `ids`
are the pairs' row numbers in the split (to find their reference translations). Under data parallelism each
global batch is split into `world_size` contiguous shares (`torch.tensor_split`), as TensorLoader does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

__all__ = ["TokenBatchLoader", "padded_slots", "plan_token_batches"]


def plan_token_batches(
    src_len: torch.Tensor,
    tgt_len: torch.Tensor,
    max_tokens: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    row_multiple: int = 1,
) -> list[torch.Tensor]:
    """The batches (row indices, int64 CPU tensors) of one epoch, as the module docstring describes."""
    src_len, tgt_len = src_len.to("cpu", torch.int64), tgt_len.to("cpu", torch.int64)
    n = len(src_len)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    # Stable sorts: by source length, then by target length, so ties keep the (shuffled) order.
    order = order[torch.sort(src_len[order], stable=True).indices]
    order = order[torch.sort(tgt_len[order], stable=True).indices]
    longest = torch.maximum(src_len, tgt_len)[order].tolist()

    batches: list[torch.Tensor] = []
    start, width = 0, 0
    for i, length in enumerate(longest):
        grown = max(width, length)
        if i > start and (i - start + 1) * grown > max_tokens:
            batches.append(order[start:i])
            start, grown = i, length
        width = grown
    if start < n:
        batches.append(order[start:])
    if row_multiple > 1:
        batches = _to_multiple(batches, row_multiple, keep_rest=not shuffle)
    if shuffle:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches


def _to_multiple(batches: list[torch.Tensor], m: int, keep_rest: bool) -> list[torch.Tensor]:
    """Cut every batch to a multiple of m rows; the rows cut off start the next batch (the pairs are in length
    order, so they fit its width). What remains at the end is dropped unless keep_rest."""
    out: list[torch.Tensor] = []
    carry = torch.empty(0, dtype=torch.int64)
    for b in batches:
        b = torch.cat([carry, b])
        cut = (len(b) // m) * m
        if cut:
            out.append(b[:cut])
        carry = b[cut:]
    if keep_rest and len(carry):
        out.append(carry)
    return out


def padded_slots(
    src_len: torch.Tensor, tgt_len: torch.Tensor, batches: list[torch.Tensor]
) -> tuple[int, int]:
    """(real tokens, padded slots) over `batches`, source and target together: the compute padding takes."""
    real = slots = 0
    for idx in batches:
        s, t = src_len[idx], tgt_len[idx]
        real += int(s.sum() + t.sum())
        slots += len(idx) * (int(s.max()) + int(t.max()))
    return real, slots


class TokenBatchLoader:
    """The loader protocol of llmlab.data.loader.TensorLoader (len, set_epoch, iter_from) over padded pairs:
    src [N, S] and tgt [N, T] (padded with `pad_id`), their lengths [N], and optional ids [N] (default
    0..N-1). Yields (src [B, S_b], tgt [B, T_b], ids [B]) — this process's share of each global batch."""

    def __init__(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_len: torch.Tensor,
        tgt_len: torch.Tensor,
        max_tokens: int,
        *,
        ids: torch.Tensor | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        row_multiple: int = 1,
    ) -> None:
        n = src.shape[0]
        if n == 0:
            raise ValueError("empty dataset")
        if any(t.shape[0] != n for t in (tgt, src_len, tgt_len)):
            raise ValueError("src, tgt and their lengths need the same first dimension")
        if max_tokens < 1 or row_multiple < 1:
            raise ValueError(f"max_tokens and row_multiple must be >= 1, got {max_tokens}, {row_multiple}")
        if shuffle and row_multiple % world_size:
            raise ValueError(f"row_multiple={row_multiple} must be a multiple of world_size={world_size}")
        self.src, self.tgt = src, tgt
        self.ids = torch.arange(n, device=src.device) if ids is None else ids
        self.src_len, self.tgt_len = src_len.to("cpu", torch.int64), tgt_len.to("cpu", torch.int64)
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size, self.row_multiple = rank, world_size, row_multiple
        self.epoch = 0
        self._plan: tuple[int, list[torch.Tensor]] | None = None
        self._len = len(self.batch_indices())

    @property
    def num_samples(self) -> int:
        return self.src.shape[0]

    def __len__(self) -> int:
        """Global batches per epoch (the same every epoch, see the module docstring)."""
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_indices(self) -> list[torch.Tensor]:
        """The rows of every global batch of the current epoch, in order."""
        if self._plan is None or self._plan[0] != self.epoch:
            plan = plan_token_batches(
                self.src_len,
                self.tgt_len,
                self.max_tokens,
                shuffle=self.shuffle,
                seed=self.seed,
                epoch=self.epoch,
                row_multiple=self.row_multiple,
            )
            self._plan = (self.epoch, plan)
        return self._plan[1]

    def iter_from(self, start: int) -> Iterator[Batch]:
        device = self.src.device
        for global_idx in self.batch_indices()[start:]:
            s_w = max(1, int(self.src_len[global_idx].max()))
            t_w = max(1, int(self.tgt_len[global_idx].max()))
            idx = torch.tensor_split(global_idx, self.world_size)[self.rank].to(device)
            src = self.src[:, :s_w].index_select(0, idx)  # [B, S_b]
            tgt = self.tgt[:, :t_w].index_select(0, idx)  # [B, T_b]
            yield src, tgt, self.ids[idx]

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)
