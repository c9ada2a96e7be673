"""Weight quantization written from the papers: absmax int8, LLM.int8() and NF4 with double quantization.

Three schemes, each a pair of functions (quantize / dequantize) and an `nn.Linear` replacement:

1. **absmax int8, per row** (`quantize_int8_rowwise`, `Int8Linear`). Each row r of W (one output channel of
   an `nn.Linear` weight [out, in]) gets its own scale s_r = absmax_r / 127 and codes
   c = round(127 W / absmax_r) in [-127, 127]; W ~ c s_r. Rounding to nearest makes |W - c s_r| <= s_r / 2
   per element, so for y = x W^T the output error is at most sum_i |x_i| s_r / 2. `Int8Linear` is
   *weight-only*: its forward dequantizes W to the input's dtype and runs `F.linear`; the activations are
   not quantized (for int8 x int8 products see `LLMInt8Linear` with threshold=0).

2. **LLM.int8()** (Dettmers, Lewis, Belkada & Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication
   for Transformers at Scale", section 3). *Vector-wise* quantization: every row of X (one token) and every
   column of W^T (= every row of the `nn.Linear` weight) has its own absmax scale, so X W^T in int8 with
   int32 accumulation is rescaled by the outer product of the two scale vectors (eq. 3-4):
   C ~ (X_i8 W_i8^T) / (c_x c_w^T) with the paper's c = 127 / absmax; we store s = 1 / c = absmax / 127
   and multiply: C ~ (s_x s_w^T) * (X_i8 W_i8^T).
   *Mixed-precision decomposition* (section 3.2, eq. 8): the few input feature dimensions h in which any
   |x| >= threshold (6.0) are outlier features. They are taken out of the int8 product and multiplied in
   floating point: Y = X[:, O] W[:, O]^T + s_x s_w^T * (X_i8[:, ~O] W_i8[:, ~O]^T). One outlier of 60 would
   otherwise set its row's scale to 60/127 and round every ordinary activation of the row (|x| ~ 1) to 0
   or +-1 step: this is the error the decomposition removes.

   Two choices, stated because they are where implementations differ:
   - The row scale of X is the absmax over the *non-outlier* columns only (the submatrix that really is
     quantized, as in eq. 8). bitsandbytes 0.50 zeroes only the outlier *elements* before taking the row
     absmax, so a sub-threshold value sitting in an outlier column still widens its row's scale. Both agree
     whenever outlier features are systematic (above the threshold in every row, the case the paper
     describes); otherwise our scale is never larger, i.e. never coarser.
   - The outlier columns of W come from the stored int8 weight, dequantized (as bitsandbytes does with
     `has_fp16_weights=False`); keeping an fp16 copy of W just for them would cost the memory the method
     is meant to save. The precision gained is on the activation side, which is where outliers live.
   Everything outside the int8 x int8 -> int32 product is computed in float32 and the result is cast to
   the input's dtype. The backward pass (`_LLMInt8Matmul`) is dL/dX = dL/dY W_hat with W_hat the
   dequantized weight: the rounding of X is treated as the identity (a straight-through estimate), the
   same rule bitsandbytes uses, so a LoRA adapter under this layer gets its gradients.

3. **NF4** (Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized
   LLMs", section 3). Weights are cut into blocks of 64 consecutive elements of the flattened (row-major)
   tensor, each scaled by its absmax into [-1, 1] and rounded to the nearest of 16 NormalFloat levels.

   The levels (`NF4_LEVELS`) are quantiles of N(0, 1): an equal share of a normal weight falls into each
   bin. Q(p) = Phi^{-1}(p) is the normal quantile function; with k = 4 bits,
     positive half: Q(p) at the 9 probabilities p evenly spaced from delta down to 1/2, dropping p = 1/2
                    -> 8 positive values,
     negative half: -Q(p) at 8 probabilities from delta down to 1/2, dropping p = 1/2 -> 7 negative values,
     plus an exact 0 (so zero-padding and zeros stay exact), then everything divided by the largest value.
   The type is asymmetric (8 positive, 7 negative levels) because 16 levels cannot be symmetric and still
   hold an exact zero. The outermost probability delta = 0.9677083 (bitsandbytes states only the constant)
   equals 1/2 [(1 - 1/(2*15)) + (1 - 1/(2*16))] to all its digits: the mean of the centres of the last of
   15 and of 16 equal-probability bins. It keeps the extreme level finite (Q(1) = inf); after the division
   the extremes are exactly -1 and +1. Computed with float32 roundings exactly as bitsandbytes'
   `create_normal_map` does (the tests check equality with its table, value by value).

   Two 4-bit codes are packed per byte, element 2i in the high nibble and element 2i+1 in the low nibble
   (bitsandbytes' order); an odd element count is padded with the code of level 0.0 (index 7).

   *Double quantization* (QLoRA section 3, "Double Quantization"): the fp32 absmax constants (one per 64
   weights, 0.5 bit per parameter) are themselves quantized: their mean is subtracted (absmax values are
   positive; centring them uses the signed code range), then they are quantized block-wise with blocks of
   256 to 8 bits using the *dynamic* 8-bit map of Dettmers 2016 ("8-Bit Approximations for Parallelism in
   Deep Learning"; `DYNAMIC_MAP_8BIT`), not a linear one. Stored: uint8 codes, one fp32 absmax per 256
   constants and the fp32 mean: 8/64 + 32/(64*256) = 0.127 bit per parameter instead of 0.5.

   Block-wise rounding (NF4 and the nested 8 bits) is to the nearest level, ties to the lower one.
   bitsandbytes 0.50's *CPU* kernel for the nested 8-bit quantization instead looks the code up in a
   65,536-entry table over [-1, 1], so near a midpoint it can pick the neighbouring code, at most one table
   bin (2/65535) farther from the value than the nearest; the tests allow exactly that and nothing more.

`quantize_model` swaps the `nn.Linear` modules of a model for one of the three layers, and `weight_bytes`
counts what the weights take as stored (codes + scales + statistics + float parameters). Each quantized
layer exposes `in_features`, `out_features`, `bias`, `dequantized_weight()` (also as the read-only
property `weight`), `set_weight(w)` (requantize, e.g. after merging a LoRA update into the dequantized
weight), `from_linear(linear)` and `to_linear()`.

Shapes: W [out, in] like `nn.Linear`, x [..., in]. Statistics (scales, absmax, offsets) are float32 and
stay float32 under `module.half()` / `.to(dtype)` (only their device follows).
The tests in tests/nn/test_quant.py prove codes, statistics and dequantized weights equal to bitsandbytes'
and the output errors within the bounds stated above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NF4_LEVELS",
    "NF4_OFFSET",
    "DYNAMIC_MAP_8BIT",
    "nf4_levels",
    "dynamic_map_8bit",
    "quantize_int8_rowwise",
    "dequantize_int8_rowwise",
    "int8_vectorwise_quantize",
    "int8_matmul",
    "llm_int8_matmul",
    "quantize_blockwise",
    "dequantize_blockwise",
    "pack_4bit",
    "unpack_4bit",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "Int8Linear",
    "LLMInt8Linear",
    "NF4Linear",
    "QUANTIZED_LINEARS",
    "quantize_model",
    "weight_bytes",
]

_TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32: a floor for absmax so 0 never divides
# torch's int8 GEMM runs on CPU from 2.4 but can overflow int32 there before 2.6 (pytorch/pytorch#136942)
_INT_MM_ON_CPU = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


# ----------------------------------------------------------------------------------------------------------
# Code books
# ----------------------------------------------------------------------------------------------------------
NF4_OFFSET = 0.9677083  # = 1/2 [(1 - 1/30) + (1 - 1/32)] to the 7 digits QLoRA / bitsandbytes use


def nf4_levels(offset: float = NF4_OFFSET) -> Tensor:
    """The 16 NormalFloat-4 levels, sorted, in [-1, 1] (see the module docstring for the derivation).

    Probabilities are spaced in float32 and the normal quantile Phi^{-1} (`torch.special.ndtri`) is taken
    in float64, then the levels are rounded to float32 and divided by their maximum in float32: the same
    sequence of roundings as bitsandbytes' `create_normal_map`, so the two tables are bit-identical.
    """
    p_pos = torch.linspace(offset, 0.5, 9)[:-1]  # 8 probabilities in (1/2, offset], float32
    p_neg = torch.linspace(offset, 0.5, 8)[:-1]  # 7 probabilities
    pos = torch.special.ndtri(p_pos.double())  # Q(p) > 0
    neg = -torch.special.ndtri(p_neg.double())  # -Q(p) < 0
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values  # [16]
    return levels / levels.max()


def dynamic_map_8bit() -> Tensor:
    """The signed 8-bit dynamic (tree) quantization map of Dettmers 2016, 256 sorted values in [-1, 1].

    A code is sign bit, then a run of zero bits whose length e picks the decade 10^-e (e = 0..6), an
    indicator 1 bit, and the remaining 6 - e bits as a linear fraction in [0.1, 1]. Decade 10^(i-6)
    (i = 0..6) therefore holds 2^i values: the midpoints of 2^i equal bins of [0.1, 1], times 10^(i-6),
    with both signs (2 * 127 values), plus 0 and 1. Small magnitudes get many levels with little
    precision each, large magnitudes few levels with more: relative precision over seven decades.
    Computed in float32 like bitsandbytes' `create_dynamic_map(signed=True)`.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0  # [2^i]
        mags = (10.0 ** (i - 6)) * mids
        values += mags.tolist() + (-mags).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


NF4_LEVELS = nf4_levels()  # [16] float32
DYNAMIC_MAP_8BIT = dynamic_map_8bit()  # [256] float32
_NF4_ZERO_CODE = int((NF4_LEVELS == 0).nonzero().item())  # 7: the padding code of an odd element count


# ----------------------------------------------------------------------------------------------------------
# absmax int8, one scale per row
# ----------------------------------------------------------------------------------------------------------
def quantize_int8_rowwise(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 per row: codes = round(127 w / absmax_row), scale = absmax_row / 127.

    w: [rows, cols] (any float dtype; the arithmetic is float32) -> (codes int8 [rows, cols],
    scale float32 [rows]). The codes are computed as w * (127 / absmax), the order bitsandbytes' kernel
    uses, so they are bit-identical to `int8_vectorwise_quant`. round() is half-to-even. A zero row
    gets scale 0 and codes 0 (no 0/0).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [rows, cols], got shape {tuple(w.shape)}")
    w = w.float()
    absmax = w.abs().amax(dim=1)  # [rows]
    inv = 127.0 / absmax.clamp_min(_TINY)  # [rows]; finite for a zero row, whose codes are 0 anyway
    codes = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)  # [rows, cols]
    return codes, absmax / 127.0


def dequantize_int8_rowwise(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes [rows, cols] int8, scale [rows] -> codes * scale (computed in float32, returned as `dtype`)."""
    return (codes.float() * scale.float()[:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# LLM.int8(): vector-wise quantization + mixed-precision decomposition
# ----------------------------------------------------------------------------------------------------------
def int8_vectorwise_quantize(x: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize the rows of x [rows, features] for LLM.int8(), holding back outlier feature columns.

    Outlier columns: features h where any |x[:, h]| >= threshold (none when threshold <= 0). They are
    zeroed before the row absmax is taken (so the scale is that of the submatrix really quantized) and
    their codes are 0; they are multiplied in floating point instead (`llm_int8_matmul`).
    Returns (codes int8 [rows, features], scale float32 [rows] = absmax / 127, outlier_cols int64 [k]).
    With threshold 0 this is exactly `quantize_int8_rowwise`.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [rows, features], got shape {tuple(x.shape)}")
    x = x.float()
    if threshold > 0.0:
        is_outlier = (x.abs() >= threshold).any(dim=0)  # [features]
        cols = is_outlier.nonzero().view(-1)
        x = x.masked_fill(is_outlier, 0.0)  # the whole column, in every row
    else:
        cols = torch.empty(0, dtype=torch.long, device=x.device)
    codes, scale = quantize_int8_rowwise(x)
    return codes, scale, cols


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [m, k] int8, b [n, k] int8 -> a b^T as int32 [m, n], exact (int32 accumulation).

    Uses torch's int8 GEMM (`torch._int_mm`) on CPU (torch >= 2.6), and on other devices where its shape
    rules hold (m > 16, k and n multiples of 8); otherwise float64, where every partial sum
    (|.| <= k * 127^2) is an integer below 2^53 and therefore exact.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 operands, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[0]
    on_cpu = a.device.type == "cpu"
    if (on_cpu and _INT_MM_ON_CPU) or (not on_cpu and m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    return (a.double() @ b.double().t()).to(torch.int32)


def llm_int8_matmul(x: Tensor, w_codes: Tensor, w_scale: Tensor, threshold: float = 6.0) -> Tensor:
    """LLM.int8() product y = x W^T with W stored as int8 rows (`quantize_int8_rowwise`), without bias.

    x: [..., in] (any float dtype), w_codes: [out, in] int8, w_scale: [out] -> y [..., out] in x.dtype.
    The inlier part is int8 x int8 with int32 accumulation, rescaled by the outer product s_x s_w^T;
    outlier feature columns (|x| >= threshold anywhere in the batch) are x[:, O] @ W_hat[:, O]^T in float32.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()  # [rows, in]
    x_codes, x_scale, cols = int8_vectorwise_quantize(x2, threshold)
    acc = int8_matmul(x_codes, w_codes)  # [rows, out] int32
    y = acc.float() * (x_scale[:, None] * w_scale.float()[None, :])  # [rows, out]
    if cols.numel():
        w_out = dequantize_int8_rowwise(w_codes[:, cols], w_scale)  # [out, k] float32
        y = y + x2[:, cols] @ w_out.t()
    return y.to(x.dtype).reshape(*shape[:-1], w_codes.shape[0])


class _LLMInt8Matmul(torch.autograd.Function):
    """Autograd wrapper for `llm_int8_matmul`: forward is LLM.int8(), backward dx = dy W_hat."""

    @staticmethod
    def forward(ctx, x: Tensor, w_codes: Tensor, w_scale: Tensor, threshold: float) -> Tensor:
        ctx.save_for_backward(w_codes, w_scale)
        return llm_int8_matmul(x, w_codes, w_scale, threshold)

    @staticmethod
    def backward(ctx, dy: Tensor):
        w_codes, w_scale = ctx.saved_tensors
        w_hat = dequantize_int8_rowwise(w_codes, w_scale, dy.dtype)  # [out, in]
        return dy @ w_hat, None, None, None  # [..., out] @ [out, in] -> [..., in]


# ----------------------------------------------------------------------------------------------------------
# Block-wise quantization to a code book, 4-bit packing
# ----------------------------------------------------------------------------------------------------------
def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """flat [n] -> [ceil(n / blocksize), blocksize], the last block zero-padded (zeros leave absmax alone)."""
    n = flat.numel()
    nblocks = max(1, -(-n // blocksize))
    return F.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Block-wise absmax quantization of x (flattened, row-major) to the nearest value of a sorted code book.

    x: any shape, n elements; code: [K] sorted values in [-1, 1] (K <= 256); blocksize: elements per block.
    Each block is scaled by 1 / its absmax (multiplied by the float32 reciprocal) into [-1, 1] and every
    value is replaced by the index of the nearest code value; a value exactly on a midpoint between two
    codes goes to the lower one. Returns (codes uint8 [n], absmax float32 [ceil(n / blocksize)]).
    An all-zero block gets absmax 0 and the code of the value nearest 0.
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = _blocks(flat, blocksize)  # [nblocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [nblocks]
    scaled = (blocks * (1.0 / absmax.clamp_min(_TINY))[:, None]).clamp_(-1.0, 1.0)
    code = code.to(device=flat.device, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2  # [K-1]: value v -> #midpoints strictly below v
    codes = torch.bucketize(scaled.reshape(-1)[:n], midpoints).to(torch.uint8)  # [n]
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """Inverse of `quantize_blockwise`: codes [n] -> code[codes] * absmax of the block, float32 [n]."""
    n = codes.numel()
    values = code.to(device=codes.device, dtype=torch.float32)[codes.reshape(-1).long()]  # [n]
    out = _blocks(values, blocksize) * absmax.float()[:, None]  # [nblocks, blocksize]
    return out.reshape(-1)[:n]


def pack_4bit(codes: Tensor, pad_code: int = _NF4_ZERO_CODE) -> Tensor:
    """codes [n] in 0..15 -> uint8 [ceil(n / 2)]: element 2i in the high nibble, 2i+1 in the low nibble.

    An odd n is padded with `pad_code` (by default NF4's exact zero, as bitsandbytes pads the scaled
    values with 0.0 before rounding).
    """
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), pad_code)])
    return (c[0::2] << 4) | c[1::2]


def unpack_4bit(packed: Tensor, n: int) -> Tensor:
    """Inverse of `pack_4bit`: packed uint8 [ceil(n / 2)] -> codes uint8 [n]."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


# ----------------------------------------------------------------------------------------------------------
# NF4 with optional double quantization
# ----------------------------------------------------------------------------------------------------------
@dataclass
class NF4Weight:
    """An NF4-quantized tensor: packed codes plus the statistics needed to dequantize it.

    packed: uint8 [ceil(n / 2)], two codes per byte. Without double quantization `absmax` holds the fp32
    block constants [nblocks]; with it, `absmax_codes` (uint8 [nblocks], dynamic 8-bit map),
    `absmax_scale` (fp32 [ceil(nblocks / nested_blocksize)]) and `absmax_offset` (fp32 scalar, the mean)
    replace it. `shape` / `dtype` are those of the original tensor.
    """

    packed: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax: Tensor | None = None
    absmax_codes: Tensor | None = None
    absmax_scale: Tensor | None = None
    absmax_offset: Tensor | None = None
    nested_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> Tensor:
        """The fp32 absmax of every block [nblocks], dequantized first under double quantization."""
        if not self.double_quant:
            return self.absmax
        centred = dequantize_blockwise(
            self.absmax_codes, self.absmax_scale, DYNAMIC_MAP_8BIT, self.nested_blocksize
        )
        return centred + self.absmax_offset

    def tensors(self) -> list[Tensor]:
        """Everything stored: packed codes and the statistics."""
        parts = [self.packed, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset]
        return [t for t in parts if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def quantize_nf4(
    w: Tensor, blocksize: int = 64, double_quant: bool = False, nested_blocksize: int = 256
) -> NF4Weight:
    """NF4 quantization of w (any shape, float dtype) in blocks of `blocksize` consecutive elements.

    With `double_quant`, the block absmax constants are centred on their mean and quantized again with the
    dynamic 8-bit map in blocks of `nested_blocksize` (QLoRA's double quantization).
    """
    codes, absmax = quantize_blockwise(w, NF4_LEVELS, blocksize)
    q = NF4Weight(packed=pack_4bit(codes), shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if not double_quant:
        q.absmax = absmax
        return q
    offset = absmax.mean()
    q.absmax_codes, q.absmax_scale = quantize_blockwise(absmax - offset, DYNAMIC_MAP_8BIT, nested_blocksize)
    q.absmax_offset = offset
    q.nested_blocksize = nested_blocksize
    return q


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """NF4Weight -> tensor of q.shape: level * block absmax computed in float32, returned as `dtype`
    (default: the dtype the tensor had before quantization)."""
    codes = unpack_4bit(q.packed, q.numel)
    w = dequantize_blockwise(codes, q.block_absmax(), NF4_LEVELS, q.blocksize)
    return w.reshape(q.shape).to(dtype or q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------
class _QuantizedLinear(nn.Module):
    """Shared plumbing: dims, bias, the dequantized-weight API, and fp32 statistics under .to(dtype)."""

    _storage: tuple[str, ...] = ()  # buffers that hold the weight as stored (codes, scales, statistics)
    _fp32: tuple[str, ...] = ()  # floating buffers that must stay float32 whatever dtype the model gets

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_dtype = dtype or torch.get_default_dtype()  # default dtype of the dequantized weight
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype))
        else:
            self.register_parameter("bias", None)

    # -- weight API ------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight [out, in] as the quantized storage represents it."""
        raise NotImplementedError

    def set_weight(self, weight: Tensor) -> None:
        """(Re)quantize a float weight [out, in] into this layer's storage."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """Read-only: the dequantized weight (a fresh tensor; change the layer with `set_weight`)."""
        return self.dequantized_weight()

    def _check_weight(self, weight: Tensor) -> Tensor:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must be [{self.out_features}, {self.in_features}], got {tuple(weight.shape)}"
            )
        return weight.detach().to(self._buffers[self._storage[0]].device)  # stay where the layer is

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> _QuantizedLinear:
        """A quantized copy of `linear` (its weight quantized, its bias copied in its dtype)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        layer.set_weight(w)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def to_linear(self) -> nn.Linear:
        """An `nn.Linear` holding the dequantized weight (and a copy of the bias)."""
        w = self.dequantized_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device)
        linear = linear.to(w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def storage_tensors(self) -> list[Tensor]:
        """The tensors the weight is stored in (not the bias)."""
        return [t for t in (getattr(self, n, None) for n in self._storage) if t is not None]

    def _bias_for(self, x: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        # `module.half()` / `.to(dtype)` must not round the fp32 statistics: move them to wherever `fn`
        # sends a float32 tensor (the device) but keep their dtype.
        kept = {n: self._buffers.pop(n) for n in self._fp32 if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                target = fn(torch.empty(0, dtype=torch.float32, device=buf.device)).device
                self._buffers[name] = buf.to(target)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int8Linear(_QuantizedLinear):
    """Weight-only absmax int8 linear layer: int8 codes [out, in] + fp32 row scales [out].

    forward: W_hat = codes * scale in the input's dtype, then `F.linear` (activations stay in float).
    Per-element weight error <= scale_row / 2, so |y - x W^T| <= sum_i |x_i| scale_row / 2 (+ rounding).
    """

    _storage = ("weight_codes", "weight_scale")
    _fp32 = ("weight_scale",)

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer(
            "weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))

    def set_weight(self, weight: Tensor) -> None:
        codes, scale = quantize_int8_rowwise(self._check_weight(weight))
        self.weight_codes, self.weight_scale = codes, scale

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int8_rowwise(self.weight_codes, self.weight_scale, dtype or self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias_for(x))


class LLMInt8Linear(Int8Linear):
    """LLM.int8() linear layer: int8 row-quantized weight, int8 x int8 product with the input quantized per
    row (vector-wise), outlier input features (|x| >= threshold) multiplied in float32.

    threshold = 0 disables the decomposition (pure vector-wise int8). Storage is that of `Int8Linear`.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, threshold: float = 6.0):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        y = _LLMInt8Matmul.apply(x, self.weight_codes, self.weight_scale, self.threshold)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


class NF4Linear(_QuantizedLinear):
    """QLoRA's 4-bit NormalFloat linear layer: packed NF4 codes + block absmax (optionally double-quantized).

    forward: dequantize to the input's dtype (the compute dtype) and run `F.linear`.
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        device=None,
        dtype=None,
        blocksize: int = 64,
        double_quant: bool = False,
        nested_blocksize: int = 256,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.nested_blocksize = nested_blocksize
        n = in_features * out_features
        nblocks = max(1, -(-n // blocksize))
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self._storage = ("weight_packed", "absmax_codes", "absmax_scale", "absmax_offset")
            self._fp32 = ("absmax_scale", "absmax_offset")
            nnested = -(-nblocks // nested_blocksize)
            self.register_buffer("absmax_codes", torch.zeros(nblocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(nnested, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self._storage = ("weight_packed", "absmax")
            self._fp32 = ("absmax",)
            self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.float32, device=device))

    def nf4_weight(self) -> NF4Weight:
        """The stored weight as an `NF4Weight` (views of this layer's buffers)."""
        q = NF4Weight(
            packed=self.weight_packed,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            nested_blocksize=self.nested_blocksize,
        )
        if self.double_quant:
            q.absmax_codes, q.absmax_scale, q.absmax_offset = (
                self.absmax_codes,
                self.absmax_scale,
                self.absmax_offset,
            )
        else:
            q.absmax = self.absmax
        return q

    def set_weight(self, weight: Tensor) -> None:
        q = quantize_nf4(self._check_weight(weight), self.blocksize, self.double_quant, self.nested_blocksize)
        self.weight_packed = q.packed
        if self.double_quant:
            self.absmax_codes, self.absmax_scale, self.absmax_offset = (
                q.absmax_codes,
                q.absmax_scale,
                q.absmax_offset,
            )
        else:
            self.absmax = q.absmax

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self.nf4_weight(), dtype or self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias_for(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}, double_quant={self.double_quant}"


QUANTIZED_LINEARS = (Int8Linear, LLMInt8Linear, NF4Linear)


# ----------------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------------
def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(
    model: nn.Module,
    method: str,
    skip: Iterable[str] = ("lm_head",),
    double_quant: bool = False,
    threshold: float = 6.0,
    blocksize: int = 64,
) -> list[str]:
    """Replace, in place, every `nn.Linear` of `model` by its quantized version; returns the replaced names.

    method: "int8" (`Int8Linear`), "llm.int8" (`LLMInt8Linear`, `threshold`) or "nf4" (`NF4Linear`,
    `blocksize`, `double_quant`). skip: module names to leave in float, matched as a dotted suffix
    ("lm_head" matches "lm_head" and "model.lm_head", not "lm_head2"). Only modules whose type is exactly
    `nn.Linear` are replaced: subclasses (e.g. the out_proj of `nn.MultiheadAttention`, whose weight is
    read directly) are left alone.
    """
    skip = tuple(skip)
    if method == "int8":
        make = Int8Linear.from_linear
    elif method == "llm.int8":

        def make(linear):
            return LLMInt8Linear.from_linear(linear, threshold=threshold)
    elif method == "nf4":

        def make(linear):
            return NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
    else:
        raise ValueError(f"method must be 'int8', 'llm.int8' or 'nf4', got {method!r}")

    targets = [
        (name, m)
        for name, m in model.named_modules()
        if name and type(m) is nn.Linear and not _skipped(name, skip)  # name "": the root can't be swapped
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(linear))
    return [name for name, _ in targets]


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights of `model` take as stored: every parameter (shared ones once) plus the codes,
    scales and statistics of its quantized layers. Other buffers (e.g. rotary tables) are not weights.
    Constant code books (the 16 NF4 levels, the 256-value dynamic map) are global, not per layer."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, _QuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in m.storage_tensors())
    return total
