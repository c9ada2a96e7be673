"""Tests for llmlab.nn.quant: absmax int8, LLM.int8() and NF4 against bitsandbytes and against the error
bounds of the papers.

Three kinds of checks:
- *equal to bitsandbytes* (0.50, CPU): codes, packed bytes, block absmax and dequantized weights are
  compared with `torch.equal`, since both sides compute the same float32 operations in the same order; the
  few places where they round differently get a bound derived for that place (each named where used);
- *within the paper's bound*: rounding to the nearest level moves a weight by at most half the gap between
  levels times its scale, so an output y = x W^T moves by at most sum_i |x_i| * that. The bounds are
  asserted with only float32 summation slack added, and each is shown not to be vacuous: a plausible bug
  (a scale of absmax / 128, swapped nibbles, the absmax of the wrong block) breaks it;
- *end to end*: a tiny `transformers.LlamaForCausalLM` quantized in place.
Everything is CPU, a few hundred weights per case.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.nn.quant import (
    DYNAMIC_MAP_8BIT,
    NF4_LEVELS,
    Int8Linear,
    LLMInt8Linear,
    NF4Linear,
    dequantize_int8_rowwise,
    dequantize_nf4,
    int8_vectorwise_quantize,
    nf4_levels,
    pack_4bit,
    quantize_int8_rowwise,
    quantize_model,
    quantize_nf4,
    unpack_4bit,
    weight_bytes,
)

try:  # bitsandbytes is in the test extras; without it only the comparisons with it are skipped
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:  # pragma: no cover
    bnb = bnbF = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed")

EPS32 = torch.finfo(torch.float32).eps
SUM_SLACK = 1e-5  # float32 sums of <= 128 terms: relative rounding <= 128 * 2^-24 ~ 8e-6 of sum |terms|
LUT_BIN = 2.0 / 65535  # bnb's CPU 8-bit quantizer rounds through a 65,536-entry table over [-1, 1]

SHAPES = [(8, 64), (5, 70), (3, 33), (1, 7)]  # block-aligned, partial last block, odd count, one tiny block
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back: bnb's LLM.int8 casts inputs and weights to fp16 before quantizing, so
    values already representable in fp16 make both sides quantize the very same numbers."""
    return t.half().float()


def _max_round_error(code: torch.Tensor) -> float:
    """Largest |v - nearest code| over v in [-1, 1]: half the widest gap, or an end not reaching +-1."""
    code = code.double()
    return max(code.diff().max().item() / 2, code[0].item() + 1, 1 - code[-1].item())


def _linear(out_f: int, in_f: int, seed: int = 0, bias: bool = True, fp16_exact: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    if fp16_exact:
        with torch.no_grad():
            for p in lin.parameters():
                p.copy_(_fp16_exact(p))
    return lin


@pytest.fixture
def no_dynamo():
    """bnb dequantizes odd-width 4-bit tensors through a torch.compile'd function: ~5 s of compilation per
    shape on CPU for the same eager arithmetic. Run it eagerly."""
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


# ----------------------------------------------------------------------------------------------------------
# Code books
# ----------------------------------------------------------------------------------------------------------
@needs_bnb
def test_nf4_levels_are_normal_quantiles_and_equal_bnb():
    lv = nf4_levels()
    assert torch.equal(lv, NF4_LEVELS)
    assert torch.equal(lv, bnbF.get_4bit_type("nf4", device="cpu"))  # bit for bit, all 16
    # structure: sorted, ends at -1 and +1, an exact 0, 7 negative and 8 positive levels
    assert (lv.diff() > 0).all() and lv[0] == -1 and lv[-1] == 1
    assert (lv == 0).sum() == 1 and (lv < 0).sum() == 7 and (lv > 0).sum() == 8
    # each positive level is a normal quantile: Phi(level * Q(delta)) recovers the evenly spaced probabilities
    # (atol: the levels are float32, 6e-8 relative; a level from a wrong quantile is off by > 1e-2)
    q_max = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    p = torch.special.ndtr(lv[lv > 0].double() * q_max)
    assert torch.allclose(p, torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1].flip(0), atol=1e-6)


@needs_bnb
def test_dynamic_map_equals_bnb():
    # double quantization's 8-bit code book: the dynamic map, not linear (bnb's quantize_blockwise default)
    assert torch.equal(DYNAMIC_MAP_8BIT, bnbF.create_dynamic_map(signed=True))
    assert DYNAMIC_MAP_8BIT.numel() == 256 and (DYNAMIC_MAP_8BIT.diff() > 0).all()


def test_pack_order_high_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 9], dtype=torch.uint8)
    packed = pack_4bit(codes)
    # element 2i -> high nibble, 2i+1 -> low nibble, odd tail padded with NF4's zero level (code 7)
    assert packed.tolist() == [0x12, 0xF0, 0x97]
    assert torch.equal(unpack_4bit(packed, 5), codes)
    assert NF4_LEVELS[7] == 0


# ----------------------------------------------------------------------------------------------------------
# absmax int8
# ----------------------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_int8_rowwise_equals_bnb_vectorwise_quant(shape, dtype):
    w = _randn(*shape, seed=1, dtype=dtype)
    ref_codes, ref_absmax, ref_cols = bnbF.int8_vectorwise_quant(w.clone(), threshold=0.0)
    codes, scale = quantize_int8_rowwise(w)
    assert ref_cols is None
    assert torch.equal(codes, ref_codes)  # same float32 products w * (127 / absmax), same half-even round
    assert torch.equal(scale, ref_absmax / 127)
    # dequantized: ours rounds twice (absmax / 127, then codes * scale), bnb three times ((codes * absmax)
    # * fl(1/127)); relative differences <= (2 + 3) * 2^-24 = 2.5 eps. Measured: <= 1.0 eps.
    ours = dequantize_int8_rowwise(codes, scale)
    ref = bnbF.int8_vectorwise_dequant(ref_codes, ref_absmax)
    assert ((ours - ref).abs() <= 2.5 * EPS32 * ref.abs()).all()


def test_int8_weight_error_within_half_step_and_not_vacuous():
    w = _randn(16, 40, seed=2)
    codes, scale = quantize_int8_rowwise(w)
    err = (dequantize_int8_rowwise(codes, scale) - w).abs()
    half_step = scale[:, None] / 2
    # rounding to nearest: |w - c s| <= s / 2, up to the float32 rounding of the product c s
    assert (err <= half_step * (1 + 4 * EPS32)).all()
    assert codes.abs().amax(dim=1).eq(127).all()  # the absmax element of every row lands on +-127
    # not vacuous: the classic slip of dividing by 128 (2^7) misplaces the absmax element by absmax / 128,
    # about twice the bound
    wrong = codes.float() * (scale * 127 / 128)[:, None]
    assert ((wrong - w).abs() > half_step).any()


def test_int8_linear_output_within_bound():
    lin = _linear(12, 48, seed=3)
    q = Int8Linear.from_linear(lin)
    x = _randn(6, 48, seed=4)
    with torch.no_grad():
        err = (q(x) - lin(x)).abs()  # [6, 12]
    bound = (x.abs() @ (q.weight_scale[:, None] / 2).expand(12, 48).t()) + SUM_SLACK * (
        x.abs() @ lin.weight.abs().t()
    )
    assert (err <= bound).all()
    # the bound is attained up to the average rounding error: with x = sign(dW) of one row, every
    # element's error adds up. Uniform rounding errors average s/4, half of s/2, so ~0.5 of the bound.
    dw = (q.dequantized_weight() - lin.weight).detach()
    x_adv = dw.sign()  # [12, 48]: row o aligned with row o's errors
    with torch.no_grad():
        err_adv = (q(x_adv) - lin(x_adv)).diagonal().abs()
    bound_adv = 48 * q.weight_scale / 2
    assert (err_adv <= bound_adv * (1 + SUM_SLACK)).all()
    assert (err_adv >= 0.3 * bound_adv).all()


# ----------------------------------------------------------------------------------------------------------
# LLM.int8()
# ----------------------------------------------------------------------------------------------------------
def _systematic_outlier_input(rows: int, features: int, seed: int) -> torch.Tensor:
    """x ~ N(0, 1) with feature 3 an outlier (|x| >= 7) in every row, as outlier features are in LLMs."""
    x = _randn(rows, features, seed=seed)
    x[:, 3] = torch.linspace(7.0, 12.0, rows) * torch.tensor([1.0, -1.0]).repeat(rows)[:rows]
    return _fp16_exact(x)


def _bnb_llm_int8(lin: nn.Linear, threshold: float) -> nn.Module:
    ref = bnb.nn.Linear8bitLt(
        lin.in_features, lin.out_features, bias=True, has_fp16_weights=False, threshold=threshold
    )
    ref.load_state_dict(lin.state_dict())
    # .to(device) is what quantizes an Int8Params; eval(), since in training mode bnb's CPU path is
    # MatMul8bitFp (dequantize + float matmul), not LLM.int8
    return ref.to("cpu").eval()


@needs_bnb
def test_int8_vectorwise_threshold_equals_bnb():
    x = _systematic_outlier_input(5, 64, seed=5)
    ref_codes, ref_absmax, ref_cols = bnbF.int8_vectorwise_quant(x.half(), threshold=6.0)
    codes, scale, cols = int8_vectorwise_quantize(x, threshold=6.0)
    assert cols.tolist() == ref_cols.tolist() == [3]
    assert torch.equal(codes, ref_codes) and (codes[:, 3] == 0).all()
    assert torch.equal(scale, ref_absmax / 127)
    # scattered outliers: bnb keeps a sub-threshold value of an outlier column (5.5 in row 3) in the row
    # absmax; we take the absmax over the non-outlier columns only. Rows without such a value are identical,
    # and ours is never coarser.
    x = _fp16_exact(_randn(5, 64, seed=6))
    x[:, 5] = torch.tensor([9.0, 0.5, -0.25, 5.5, 1.0])
    ref_codes, ref_absmax, ref_cols = bnbF.int8_vectorwise_quant(x.half(), threshold=6.0)
    codes, scale, cols = int8_vectorwise_quantize(x, threshold=6.0)
    assert cols.tolist() == ref_cols.tolist() == [5]
    same = torch.tensor([True, True, True, False, True])
    assert torch.equal(codes[same], ref_codes[same]) and torch.equal(scale[same], ref_absmax[same] / 127)
    assert scale[3] < ref_absmax[3] / 127 and ref_absmax[3] == 5.5


@needs_bnb
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_llm_int8_linear_equals_bnb_linear8bitlt(threshold, dtype):
    lin = _linear(24, 64, seed=7, fp16_exact=True)
    ref = _bnb_llm_int8(lin, threshold)
    ours = LLMInt8Linear.from_linear(lin, threshold=threshold)
    assert torch.equal(ours.weight_codes, ref.weight.data) and torch.equal(
        ours.weight_scale, ref.weight.SCB / 127
    )
    x = _systematic_outlier_input(5, 64, seed=8).to(dtype)
    with torch.no_grad():
        y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype == dtype
    if threshold > 0:
        assert ref.state.idx.tolist() == [3]
    # Same codes and scales, so the int32 products are identical; what differs is the rescaling: bnb's
    # CPU/default int8_mm_dequant multiplies by 6.200124e-05 for 1/127^2 = 6.2000124e-05 (a typo: 1.8e-5
    # relative; its CUDA kernel has 6.200012e-05), plus float32 rounding (~1e-7). So 2e-5 of sum |x| |W|
    # (measured: 0.4 of it). One int8 code of x off by one moves y by s_x |W_hat[o, h]|, 10-100x this.
    w_hat = ours.dequantized_weight()
    tol = 2e-5 * (x.float().abs() @ w_hat.abs().t())
    if dtype == torch.float16:
        # bnb continues in fp16 after the int8 product: the int8 part is rounded to fp16, the outlier
        # weights are cast to fp16 and added by an fp16 addmm; we round once at the end. Four roundings of
        # u = eps/2 of terms bounded by sum |x| |W|: 2 eps of it (measured: 0.16 of it). At this precision
        # only the float32 case above resolves a single wrong code; this one checks the fp16 plumbing.
        tol = tol + 2 * torch.finfo(torch.float16).eps * (x.float().abs() @ w_hat.abs().t())
    assert ((y.float() - y_ref.float()).abs() <= tol).all()


@needs_bnb
def test_llm_int8_scattered_outliers_vs_bnb_within_method_error():
    lin = _linear(24, 64, seed=9, fp16_exact=True)
    ref = _bnb_llm_int8(lin, 6.0)
    ours = LLMInt8Linear.from_linear(lin, threshold=6.0)
    x = _fp16_exact(_randn(5, 64, seed=10))
    x[:, 5] = torch.tensor([9.0, 0.5, -0.25, 5.5, 1.0])
    with torch.no_grad():
        y, y_ref = ours(x), ref(x)
    # Both approximate the exact mixed product y* = x[:, O] W_hat[:, O]^T + x[:, ~O] W_hat[:, ~O]^T + b, each
    # within (its row scale s_x / 2) * sum_{h not in O} |W_hat[o, h]|. The two row scales differ in row 3
    # (bnb's 5.5 / 127 vs ours), so the tolerance is the sum of the two bounds, plus bnb's 1.8e-5 constant.
    w_hat = ours.dequantized_weight()
    inlier = torch.ones(64, dtype=torch.bool)
    inlier[5] = False
    _, s_ours, _ = int8_vectorwise_quantize(x, 6.0)
    _, absmax_ref, _ = bnbF.int8_vectorwise_quant(x.half(), threshold=6.0)
    row_w = w_hat[:, inlier].abs().sum(1)  # [out]
    tol = ((s_ours + absmax_ref / 127)[:, None] / 2) * row_w[None, :] + 2e-5 * (x.abs() @ w_hat.abs().t())
    assert ((y - y_ref).abs() <= tol).all()
    same = torch.tensor([True, True, True, False, True])  # rows with equal scales agree to the constant
    assert ((y - y_ref).abs()[same] <= 2e-5 * (x.abs() @ w_hat.abs().t())[same]).all()


def test_llm_int8_outliers_go_through_full_precision():
    lin = _linear(16, 64, seed=11)
    x = _randn(8, 64, seed=12)
    x[:, 10] = 60.0 * torch.tensor([1.0, -1.0]).repeat(4)  # one systematic outlier feature, |x| = 60
    decomposed = LLMInt8Linear.from_linear(lin, threshold=6.0)
    plain = LLMInt8Linear.from_linear(lin, threshold=0.0)  # every feature through int8
    w_hat = decomposed.dequantized_weight()
    with torch.no_grad():
        exact_hat = F.linear(x, w_hat, lin.bias)  # the quantized weight, activations unquantized
        y_dec, y_plain = decomposed(x), plain(x)
    # int8 rounding of x only: |error| <= s_x / 2 * sum over quantized features of |W_hat[o, h]|, with s_x the
    # row absmax / 127 over the quantized features. Outlier column 10 must contribute no error at all.
    _, s_dec, cols = int8_vectorwise_quantize(x, 6.0)
    assert cols.tolist() == [10]
    inlier = torch.ones(64, dtype=torch.bool)
    inlier[10] = False
    slack = SUM_SLACK * (x.abs() @ w_hat.abs().t())
    assert ((y_dec - exact_hat).abs() <= s_dec[:, None] / 2 * w_hat[:, inlier].abs().sum(1) + slack).all()
    _, s_plain, _ = int8_vectorwise_quantize(x, 0.0)
    assert ((y_plain - exact_hat).abs() <= s_plain[:, None] / 2 * w_hat.abs().sum(1) + slack).all()
    # without the decomposition the outlier sets s_x = 60/127 and rounds every ordinary feature (|x| ~ 1) to
    # a step of 0.47: the error is >= 10x larger (measured ~25x in max, ~20x in rms)
    err_dec, err_plain = (y_dec - exact_hat).abs(), (y_plain - exact_hat).abs()
    assert err_plain.max() > 10 * err_dec.max() and err_plain.norm() > 10 * err_dec.norm()
    # against the float32 layer, the weight's own rounding adds sum_h |x_h| s_w / 2
    with torch.no_grad():
        err_fp32 = (y_dec - lin(x)).abs()
    w_bound = x.abs() @ (decomposed.weight_scale[:, None] / 2).expand(16, 64).t()
    assert (err_fp32 <= s_dec[:, None] / 2 * w_hat[:, inlier].abs().sum(1) + w_bound + slack).all()


def test_llm_int8_backward_is_dequantized_weight():
    lin = _linear(10, 32, seed=13)
    layer = LLMInt8Linear.from_linear(lin, threshold=6.0)
    x = _randn(2, 3, 32, seed=14)
    x[..., 0] = 8.0
    x.requires_grad_(True)
    dy = _randn(2, 3, 10, seed=15)
    (layer(x) * dy).sum().backward()
    # straight-through: the rounding of x is taken as identity, dL/dx = dy W_hat (one float32 matmul)
    expected = dy @ layer.dequantized_weight()
    assert torch.allclose(
        x.grad, expected, rtol=0, atol=SUM_SLACK * (dy.abs() @ layer.dequantized_weight().abs()).max()
    )
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, dy.sum((0, 1)))


# ----------------------------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_equals_bnb(shape, dtype, no_dynamo):
    w = _randn(*shape, seed=16, dtype=dtype)
    packed_ref, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(w, blocksize=64)
    n = w.numel()
    assert packed_ref.shape == (-(-n // 2), 1) and q.packed.shape == (-(-n // 2),)
    assert torch.equal(q.packed, packed_ref.view(-1))  # every byte, both nibbles, the odd-count padding
    assert torch.equal(q.absmax, state.absmax)
    ref = bnbF.dequantize_4bit(packed_ref, state)
    ours = dequantize_nf4(q)
    assert ours.dtype == ref.dtype == dtype and ours.shape == ref.shape == w.shape
    assert torch.equal(ours, ref)  # level * absmax in float32, rounded once to the dtype: same bits


@needs_bnb
@pytest.mark.parametrize("shape", [(64, 300), (5, 70), (3, 33)], ids=str)
def test_nf4_double_quant_equals_bnb(shape, no_dynamo):
    # (64, 300): 300 block constants -> two nested blocks of 256 (one partial)
    w = _randn(*shape, seed=17)
    packed_ref, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(q.packed, packed_ref.view(-1))
    assert state.nested and state.state2.blocksize == 256
    assert torch.equal(state.state2.code, DYNAMIC_MAP_8BIT)  # nested code book: the dynamic map
    assert torch.equal(q.absmax_offset, state.offset)  # the mean of the fp32 constants
    assert torch.equal(q.absmax_scale, state.state2.absmax)  # absmax of each nested block of 256
    # nested codes: ours is the exact nearest code; bnb's CPU kernel rounds v through a 65,536-entry table
    # over [-1, 1], so it may pick a neighbour when the table bin is too coarse: its code is then at most
    # one bin (2/65535) farther from v than ours. Measured: 0-2 of 300 codes differ, all |v| < 1e-3.
    absmax = quantize_nf4(w, blocksize=64).absmax
    nested_scale = q.absmax_scale.repeat_interleave(256)[: absmax.numel()]
    v = (absmax - q.absmax_offset) * (1.0 / nested_scale)
    code = DYNAMIC_MAP_8BIT
    d_ours = (v - code[q.absmax_codes.long()]).abs()
    d_ref = (v - code[state.absmax.long()]).abs()
    assert torch.equal(d_ours, (v[:, None] - code[None, :]).abs().amin(1))  # ours is the nearest
    assert (d_ref <= d_ours + LUT_BIN).all()
    # final dequantized weight: equal bits where the nested codes agree; elsewhere the block constant
    # differs by |code_ours - code_ref| * nested absmax (one gap of the map, ~1e-4 near 0), and each
    # weight by at most that (|level| <= 1)
    ours = dequantize_nf4(q)
    ref = bnbF.dequantize_4bit(packed_ref, state)
    same_block = (q.absmax_codes == state.absmax).repeat_interleave(64)[: w.numel()].view(shape)
    assert torch.equal(ours[same_block], ref[same_block])
    d_absmax = (code[q.absmax_codes.long()] - code[state.absmax.long()]).abs() * nested_scale
    diff_tol = d_absmax.repeat_interleave(64)[: w.numel()].view(shape) * (1 + 1e-5) + 4 * EPS32
    assert ((ours - ref).abs() <= diff_tol).all()


def _nf4_elementwise_absmax(q, shape) -> torch.Tensor:
    return q.block_absmax().repeat_interleave(q.blocksize)[: shape[0] * shape[1]].view(shape)


def test_nf4_weight_error_bound_and_not_vacuous():
    shape = (16, 96)  # 24 blocks, rows do not align with blocks (96 = 1.5 blocks)
    w = _randn(*shape, seed=18)
    q = quantize_nf4(w)
    absmax = _nf4_elementwise_absmax(q, shape)
    # half the widest NF4 gap, the bottom one: (-0.6961928 - (-1)) / 2 = 0.1519 (7 negative levels are
    # sparser than the 8 positive ones; the top gap is (1 - 0.7229568) / 2 = 0.1385)
    half_gap = _max_round_error(NF4_LEVELS)
    assert abs(half_gap - 0.15190) < 1e-4
    err = (dequantize_nf4(q) - w).abs()
    assert (err <= half_gap * absmax * (1 + 4 * EPS32)).all()
    # not vacuous: swapping the two nibbles of each byte (the packing-order bug) ...
    p = q.packed
    swapped = copy.copy(q)
    swapped.packed = (p << 4) | (p >> 4)
    assert ((dequantize_nf4(swapped) - w).abs() > half_gap * absmax).any()
    # ... or the absmax of the neighbouring block breaks the bound
    shifted = copy.copy(q)
    shifted.absmax = q.absmax.roll(1)
    assert ((dequantize_nf4(shifted) - w).abs() > half_gap * absmax).any()


def test_nf4_linear_output_within_bound():
    lin = _linear(12, 80, seed=19)
    x = _randn(4, 80, seed=20)
    for double_quant in (False, True):
        layer = NF4Linear.from_linear(lin, double_quant=double_quant)
        q = layer.nf4_weight()
        true_absmax = _nf4_elementwise_absmax(quantize_nf4(lin.weight.detach()), (12, 80))
        stored_absmax = _nf4_elementwise_absmax(q, (12, 80))
        # per weight: level a_hat - w = (level a - w) + level (a_hat - a), |level| <= 1 (a: block absmax)
        per_w = _max_round_error(NF4_LEVELS) * true_absmax + (stored_absmax - true_absmax).abs()
        if double_quant:  # and absmax_hat is itself within the dynamic map's rounding of the nested scale
            nested = q.absmax_scale.repeat_interleave(256)[: q.absmax_codes.numel()]
            err_c = (q.block_absmax() - quantize_nf4(lin.weight.detach()).absmax).abs()
            assert (err_c <= _max_round_error(DYNAMIC_MAP_8BIT) * nested * (1 + 1e-5) + 4 * EPS32).all()
            assert err_c.max() > 0  # really quantized
        with torch.no_grad():
            err = (layer(x) - lin(x)).abs()
        bound = x.abs() @ per_w.t() + SUM_SLACK * (x.abs() @ lin.weight.abs().t())
        assert (err <= bound).all()


# ----------------------------------------------------------------------------------------------------------
# Edge cases: zero rows, half-precision inputs
# ----------------------------------------------------------------------------------------------------------
def test_zero_rows_give_zeros_not_nan():
    w = _randn(4, 64, seed=21)
    w[1] = 0  # an all-zero row = a whole NF4 block, absmax 0
    codes, scale = quantize_int8_rowwise(w)
    assert scale[1] == 0 and (codes[1] == 0).all()
    assert torch.equal(dequantize_int8_rowwise(codes, scale)[1], torch.zeros(64))
    for dq in (False, True):
        q = quantize_nf4(w, double_quant=dq)
        if not dq:
            assert q.absmax[1] == 0
            assert (q.packed[32:64] == 0x77).all()  # both nibbles the exact-zero level
        out = dequantize_nf4(q)
        assert torch.isfinite(out).all()
        # codes of the zero level: exact zeros even when double quantization gives the block absmax ~ 0
        assert torch.equal(out[1], torch.zeros(64))
    # LLM.int8: an input row that is zero (or whose only nonzeros are outliers) has row scale 0
    lin = _linear(8, 64, seed=22)
    layer = LLMInt8Linear.from_linear(lin)
    x = _randn(3, 64, seed=23)
    x[0] = 0
    x[1] = 0
    x[1, 7] = 20.0  # outlier column 7; row 1 has nothing else
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], lin.bias.detach())
    assert torch.allclose(y[1], 20.0 * layer.dequantized_weight()[:, 7] + lin.bias, rtol=1e-6, atol=1e-6)
    zero = NF4Linear(64, 4, bias=False)
    zero.set_weight(torch.zeros(4, 64))
    with torch.no_grad():
        assert torch.equal(zero(x), torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [Int8Linear, LLMInt8Linear, NF4Linear], ids=lambda c: c.__name__)
def test_half_precision_inputs(cls, dtype):
    lin = _linear(12, 70, seed=24)  # 840 weights: 13 NF4 blocks, the last partial
    layer = cls.from_linear(lin)
    x = _randn(2, 3, 70, seed=25, dtype=dtype)
    x[..., 2] = 9.0  # an outlier feature for LLM.int8
    with torch.no_grad():
        y = layer(x)
        w_hat = layer.dequantized_weight()  # float32
        if cls is LLMInt8Linear:  # float32 arithmetic inside, one rounding to the dtype at the end
            ref = layer(x.float())
        else:  # same dequantized weight in float32
            ref = F.linear(x.float(), w_hat, lin.bias)
    assert y.dtype == dtype and y.shape == (2, 3, 12)
    # the 16-bit path rounds each weight and the bias to the dtype (relative u = eps / 2) and the result
    # once more: |y - ref| <= u (sum |x| |W| + |b|) + u |y|, with u doubled for the matmul's own rounding
    u = torch.finfo(dtype).eps
    tol = u * (x.float().abs() @ w_hat.abs().t() + lin.bias.abs()) + u * ref.abs()
    assert ((y.float() - ref).abs() <= tol).all()


# ----------------------------------------------------------------------------------------------------------
# Layer API (what LoRA relies on)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda lin: Int8Linear.from_linear(lin),
        lambda lin: LLMInt8Linear.from_linear(lin, threshold=6.0),
        lambda lin: NF4Linear.from_linear(lin),
        lambda lin: NF4Linear.from_linear(lin, double_quant=True),
    ],
    ids=["int8", "llm.int8", "nf4", "nf4-dq"],
)
def test_layer_api(make):
    lin = _linear(10, 70, seed=26)
    layer = make(lin)
    assert (layer.in_features, layer.out_features) == (70, 10)
    w_hat = layer.dequantized_weight()
    assert w_hat.shape == (10, 70) and w_hat.dtype == torch.float32
    assert torch.equal(layer.weight, w_hat)
    assert torch.equal(layer.bias, lin.bias)
    x = _randn(3, 70, seed=27)
    with torch.no_grad():
        y = layer(x)
    # to_linear: an nn.Linear with the dequantized weight (exact for the dequantizing layers)
    with torch.no_grad():
        y_lin = layer.to_linear()(x)
    if isinstance(layer, LLMInt8Linear):
        assert (y - y_lin).abs().max() < 0.05  # LLM.int8 also rounds x: a different, coarser product
    else:
        assert torch.equal(y, y_lin)
    # dequantize -> (merge a zero update) -> requantize must not drift: the levels times the same scales
    # are fixed points of the quantizer. This is the path a LoRA merge takes.
    before = layer.nf4_weight() if isinstance(layer, NF4Linear) else None
    layer.set_weight(w_hat)
    if isinstance(layer, NF4Linear) and layer.double_quant:
        # except for double quantization, which quantizes the (new) block constants again around a new mean:
        # the 4-bit codes stay, each constant moves by at most the dynamic map's rounding of its nested block
        after = layer.nf4_weight()
        assert torch.equal(after.packed, before.packed)
        nested = after.absmax_scale.repeat_interleave(256)[: after.absmax_codes.numel()]
        drift = (after.block_absmax() - before.block_absmax()).abs()
        # (+ the float32 rounding of code * scale + mean, a few eps of the constant)
        slack = 4 * EPS32 * after.block_absmax().abs()
        assert (drift <= _max_round_error(DYNAMIC_MAP_8BIT) * nested + slack).all()
    else:
        assert torch.equal(layer.dequantized_weight(), w_hat)
    # a real update is requantized (LoRA merge): the stored weight moves to the new one within its bound
    delta = 0.01 * _randn(10, 70, seed=28)
    layer.set_weight(w_hat + delta)
    assert not torch.equal(layer.dequantized_weight(), w_hat)
    # state_dict round trip into a fresh layer of the same kind
    fresh = make(_linear(10, 70, seed=29))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())
    # .half() moves floats to fp16 but the statistics stay float32 (else dequantization would round them)
    half = copy.deepcopy(layer).half()
    assert all(t.dtype in (torch.float32, torch.uint8, torch.int8) for t in half.storage_tensors())
    assert half.bias.dtype == torch.float16
    assert torch.equal(half.dequantized_weight(torch.float32), layer.dequantized_weight())
    with pytest.raises(ValueError):
        layer.set_weight(torch.zeros(70, 10))


# ----------------------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(30)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12), generator=_gen(31))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, ids, logits


LINEARS_PER_LAYER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "method, double_quant, cls",
    [
        ("int8", False, Int8Linear),
        ("llm.int8", False, LLMInt8Linear),
        ("nf4", False, NF4Linear),
        ("nf4", True, NF4Linear),
    ],
    ids=["int8", "llm.int8", "nf4", "nf4-dq"],
)
def test_quantize_model_tiny_llama(tiny_llama, method, double_quant, cls):
    ref_model, ids, ref_logits = tiny_llama
    model = copy.deepcopy(ref_model)
    names = quantize_model(model, method, skip=("lm_head",), double_quant=double_quant)
    expected = [
        f"model.layers.{i}.{part}.{p}"
        for i in range(2)
        for part, projs in (("self_attn", LINEARS_PER_LAYER[:4]), ("mlp", LINEARS_PER_LAYER[4:]))
        for p in projs
    ]
    assert names == expected
    assert all(type(model.get_submodule(n)) is cls for n in names)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, ref_model.lm_head.weight)

    with torch.no_grad():
        logits = model(input_ids=ids).logits
    # Tolerance from the measured per-layer weight error e_W = |W_hat - W|_F / |W|_F (itself the method's:
    # int8 ~ step / sqrt(12) / rms(W) = 0.6%, NF4 ~ 9%). Each of the 14 layers perturbs the residual stream by
    # ~ e_W times its share of it; the perturbations are independent, so the logits move by ~ e_W (measured
    # 1.01-1.15 e_W for the weight-only layers, 1.6 e_W for LLM.int8, which also rounds the activations).
    # 2.5 e_W leaves margin; a broken layer (wrong scale, packing, transposed weight) has e_W ~ 1 and moves
    # the logits by O(1). e_W itself is the method's: < 1% for int8 (0.66%), < 12% for NF4 (9.3%).
    e_w = max(
        (
            (model.get_submodule(n).dequantized_weight() - ref_model.get_submodule(n).weight).norm()
            / ref_model.get_submodule(n).weight.norm()
        ).item()
        for n in names
    )
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert 0 < rel <= 2.5 * e_w
    assert e_w < (0.01 if method in ("int8", "llm.int8") else 0.12)

    # weight bytes: every replaced layer's fp32 weight (4 bytes / weight) becomes its stored form
    def stored(out_f, in_f):
        n = out_f * in_f
        if method in ("int8", "llm.int8"):
            return n + 4 * out_f  # int8 codes + one fp32 scale per row
        nblocks = -(-n // 64)
        if not double_quant:
            return n // 2 + 4 * nblocks  # two codes per byte + fp32 absmax per 64
        return n // 2 + nblocks + 4 * -(-nblocks // 256) + 4  # + uint8 absmax, fp32 per 256, fp32 mean

    dims = [(ref_model.get_submodule(n).out_features, ref_model.get_submodule(n).in_features) for n in names]
    fp32_bytes = sum(4 * o * i for o, i in dims)
    q_bytes = sum(stored(o, i) for o, i in dims)
    assert weight_bytes(ref_model) - weight_bytes(model) == fp32_bytes - q_bytes
    assert sum(weight_bytes(model.get_submodule(n)) for n in names) == q_bytes
    ratio = fp32_bytes / q_bytes
    lo, hi = (
        {"int8": (3.7, 4.0), "llm.int8": (3.7, 4.0), "nf4": (7.0, 7.2)}[method]
        if not double_quant
        else (7.7, 7.8)
    )
    assert lo < ratio < hi  # ~4x (scales: 4 in / (in + 4)); ~8x (NF4: 32 / 4.5 = 7.1, double quant: 7.75)


def test_quantize_model_skip_and_errors():
    model = nn.Sequential()
    model.add_module("lm_head", nn.Linear(4, 4))
    model.add_module("lm_head2", nn.Linear(4, 4))
    model.add_module("attn", nn.MultiheadAttention(4, 1))  # its out_proj is a Linear subclass: left alone
    names = quantize_model(model, "nf4")
    assert names == ["lm_head2"]
    assert type(model.lm_head) is nn.Linear and isinstance(model.lm_head2, NF4Linear)
    with pytest.raises(ValueError):
        quantize_model(model, "int4")
