"""llmlab/memory/predict.py: the ZeRO paper's accounting (Rajbhandari et al. 2020, §5: 16Ψ → 4Ψ + 12Ψ/N →
2Ψ + 14Ψ/N → 16Ψ/N for Adam in mixed precision) where it applies (DeepSpeed's 16-bit mode), the
4Ψ + 4Ψ + 8Ψ of torch autocast, per-rank padding of each layout, and the strategy names."""

from __future__ import annotations

import pytest

from llmlab.memory.predict import layout_for, predict_memory, predict_states
from llmlab.models.gpt import GPT_PRESETS, GPTConfig

N = 4
SHAPES = [(64, 32), (128,), (256, 8)]  # every numel divides by N: no padding
PSI = 64 * 32 + 128 + 256 * 8


@pytest.mark.parametrize(
    "stage, expected",
    [(0, 16 * PSI), (1, 4 * PSI + 12 * PSI // N), (2, 2 * PSI + 14 * PSI // N), (3, 16 * PSI // N)],
)
def test_zero_paper_mixed_precision(stage, expected):
    p = predict_states(SHAPES, layout_for("deepspeed", ds_stage=stage), N, 0, "bf16", "adamw")
    assert p.total == expected  # the paper's table (K = 12), divisible case


@pytest.mark.parametrize(
    "strategy, expected",
    [("ddp", 16 * PSI), ("zero1", 8 * PSI + 8 * PSI // N), ("zero2", 4 * PSI + 12 * PSI // N),
     ("zero3", 16 * PSI // N), ("fsdp2", 16 * PSI // N)],
)  # fmt: skip
def test_autocast_keeps_fp32_states(strategy, expected):
    step = 4 * len(SHAPES)  # AdamW's 0-dim fp32 `step` per parameter tensor
    for precision in ("fp32", "bf16"):
        p = predict_states(SHAPES, layout_for(strategy), N, 0, precision, "adamw")
        assert p.total == expected + step


def test_deepspeed_in_fp32_is_plain_fp32():
    p = predict_states(SHAPES, layout_for("deepspeed", ds_stage=0), N, 0, "fp32", "adamw")
    assert (p.params, p.grads, p.optimizer) == (4 * PSI, 4 * PSI, 8 * PSI)


def test_frozen_parameters_have_no_gradient_or_optimizer_state():
    """LoRA: the base is frozen, so only the trained tensors (here the second) carry gradients, AdamW's two
    moments and its step counter; the parameters themselves are all still held."""
    shapes = [(100, 10), (4, 10)]
    p = predict_states(shapes, layout_for("ddp"), 1, 0, "fp32", "adamw", frozen=[0])
    assert (p.params, p.grads, p.optimizer) == (4 * 1040, 4 * 40, 8 * 40 + 4)
    z = predict_states(shapes, layout_for("zero3"), 2, 0, "fp32", "adamw", frozen=[0])
    assert (z.params, z.grads, z.optimizer) == (4 * 520, 4 * 20, 8 * 20 + 4)


def test_our_zero_chunks_per_rank():
    """610 elements over 3 ranks: chunks of 204; ranks 0 and 1 own 204, rank 2 owns 202, and every rank's
    stage-2 gradient is the 204-element reduce-scatter buffer."""
    shapes = [(61, 10)]
    owned = []
    for rank in range(3):
        p = predict_states(shapes, layout_for("zero3"), 3, rank, "fp32", "sgd", momentum=0.9)
        owned.append(p.params // 4)
        assert p.grads == 4 * 204 and p.optimizer == p.params
    assert owned == [204, 204, 202]


def test_fsdp2_pads_dim0():
    p = predict_states([(5, 3)], layout_for("fsdp2"), 4, 3, "fp32", "sgd", momentum=0.0)
    assert p.params == 4 * 2 * 3 and p.optimizer == 0  # ⌈5/4⌉ = 2 rows of 3 on every rank


def test_offload_moves_states_to_host():
    p = predict_states(SHAPES, layout_for("deepspeed", 3, "all"), N, 0, "bf16", "adamw")
    assert p.optimizer == 0 and p.params == 0 and p.host == 12 * PSI // N + 2 * PSI // N
    assert layout_for("deepspeed2_offload").offload == "optimizer"


def test_ddp_buckets_and_names():
    p = predict_states(SHAPES, layout_for("ddp"), 2, 0, "fp32", "adamw")
    assert p.buffers == 4 * PSI
    assert layout_for("deepspeed", ds_stage=1).strategy == "deepspeed1"
    with pytest.raises(ValueError, match="unknown strategy"):
        layout_for("zero4")


def test_gpt2_124m_on_the_meta_device():
    cfg = GPTConfig(**{**vars(GPT_PRESETS["gpt2"])})
    p = predict_memory(cfg, micro_batch=8, precision="bf16", device="cuda", strategy="ddp")
    assert p.n_params == 124_439_808  # GPT-2 small, tied head counted once
    assert p.states.total == 16 * p.n_params + 4 * 196  # 196 parameter tensors, one `step` each
    assert p.activations is not None and p.activations.param_copies > 2 * 85_000_000
