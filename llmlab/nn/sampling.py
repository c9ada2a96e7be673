"""Generating text from a decoder-only language model (llmlab.models.gpt): greedy or sampled, on a KV cache.

At each step the model's next-token logits z [B, V] are reshaped, then a token is picked:

1. repetition penalty (Keskar et al. 2019, CTRL §4.1): every token already in the sequence (prompt included)
   has its logit divided by θ when positive and multiplied by θ when negative — both make it less likely;
2. temperature T: z / T (T < 1 sharpens, T > 1 flattens; T = 0 means greedy: argmax);
3. top-k (Fan et al. 2018): only the k largest logits stay;
4. top-p, nucleus sampling (Holtzman et al. 2020): only the smallest set of tokens whose probabilities sum
   to at least p stays (sorted ascending, tokens whose cumulative probability is ≤ 1 - p go; the most
   likely token always stays);
5. a token is drawn from softmax(z) with `torch.multinomial`, or taken as the argmax.

This is the order and the arithmetic of HF transformers' `generate` (RepetitionPenaltyLogitsProcessor, then
the Temperature, TopK and TopP warpers, then multinomial), so with the same weights and the same torch RNG
state the same tokens come out — tests/nn/test_sampling.py checks greedy and sampled runs against HF.

With the KV cache (`use_cache=True`) the prompt is run once and each new token costs one position; without
it the whole sequence is re-run every step (the reference the tests compare the cache against). A model with
learned positions sees at most `block_size` tokens: once the text is longer, each step re-runs the last
`block_size` tokens without the cache (nanoGPT's sliding window; a cached key keeps the position it was
computed at, so the cache cannot slide), and a longer prompt keeps only its last `block_size` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["SampleConfig", "generate", "process_logits"]


@dataclass
class SampleConfig:
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set with probability >= p
    repetition_penalty: float = 1.0  # θ of CTRL; 1 = off
    eos_id: int | None = None  # stop a row once it produced this token (later tokens: eos_id again)

    def __post_init__(self) -> None:
        # Outside these bounds z / T or z · θ overflows float32 to inf and softmax gives NaN; nothing useful
        # lies beyond them (T = 0.01 is already greedy in all but exact ties).
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if not (self.temperature == 0 or 0.01 <= self.temperature <= 100):
            raise ValueError("temperature must be 0 (greedy) or between 0.01 and 100")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1 (or none)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1] (or none)")
        if not 0.01 <= self.repetition_penalty <= 100:
            raise ValueError("repetition_penalty must be between 0.01 and 100 (1 = off)")


def process_logits(logits: Tensor, seen: Tensor, cfg: SampleConfig) -> Tensor:
    """Steps 1-4 of the module docstring: logits [B, V], seen [B, t] token ids so far -> new logits [B, V]."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits.clone()
    if cfg.repetition_penalty != 1.0:
        prev = z.gather(1, seen)  # [B, t]
        prev = torch.where(prev < 0, prev * cfg.repetition_penalty, prev / cfg.repetition_penalty)
        z = z.scatter(1, seen, prev)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        z = z / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < z.shape[-1]:
        kth = torch.topk(z, cfg.top_k, dim=-1).values[..., -1:]  # [B, 1] the k-th largest
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=False)  # [B, V] ascending
        cumulative = sorted_z.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
        drop = cumulative <= (1 - cfg.top_p)
        drop[..., -1:] = False  # the most likely token always stays
        z = z.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return z


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: Tensor,
    cfg: SampleConfig,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """idx [B, T] prompt ids (every row the same length) -> [B, T + n] with n <= max_new_tokens new tokens
    (fewer when every row has produced `eos_id`); any length (see the sliding window in the module docstring).
    Sampling draws from `generator`, else torch's global RNG."""
    block = model.cfg.block_size
    was_training = model.training
    model.eval()
    try:
        caches = model.new_caches() if use_cache and idx.shape[1] <= block else None
        logits = model(idx[:, -block:], caches)[:, -1]  # [B, V]
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(cfg.max_new_tokens):
            z = process_logits(logits, idx, cfg)
            if cfg.temperature == 0:
                nxt = z.argmax(dim=-1)  # [B]
            else:
                nxt = torch.multinomial(z.softmax(dim=-1), 1, generator=generator).squeeze(1)  # [B]
            if cfg.eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, cfg.eos_id), nxt)
                done |= nxt.eq(cfg.eos_id)
            idx = torch.cat([idx, nxt[:, None]], dim=1)  # [B, t + 1]
            if cfg.eos_id is not None and bool(done.all()):
                break
            if caches is not None and idx.shape[1] <= block:  # the newest token still has a position
                logits = model(nxt[:, None], caches)[:, -1]  # [B, V]
            else:  # the context is full: the last block_size tokens, re-run
                caches = None
                logits = model(idx[:, -block:])[:, -1]  # [B, V]
    finally:
        model.train(was_training)
    return idx
