"""Activation memory of our GPT (llmlab/models/gpt.py): every tensor autograd saves for backward, per
transformer layer and once per model, in bytes — the per-layer accounting of Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", §4.1, redone for this code.

Korthikanti et al. count, for one GPT layer in 16-bit with 1-byte dropout masks and no parallelism,

    34·s·b·h + 5·a·s²·b  bytes                 s sequence, b micro-batch, h hidden, a heads

(attention 11sbh + 5as²b: QKV input 2, Q and K 4, softmax 2as²b, its dropout mask as²b, dropped
probabilities 2as²b, V 2, out-projection input 2, residual dropout mask 1; MLP 19sbh: input 2, GELU input
8, GELU output 8, dropout mask 1; the two LayerNorm inputs 4). What OUR code saves differs, and every term
below was read off the autograd graph (tests/memory/test_activations.py checks the total against
`SavedTensorMeter` on tiny and medium configs, both attention paths, fp32 and bf16 autocast, dropout on and
off, checkpointing on and off):

- the residual stream is fp32 even under autocast (the parameters are fp32, autocast keeps them so, and
  fp32 + bf16 promotes), and LayerNorm runs in fp32: each LayerNorm input costs 4sbh, plus its mean and
  rstd (2·4·sb);
- q, k and v come from ONE GEMM with the stacked [3h, h] weight (llmlab/nn/attention.py `_project_qkv`), which
  saves its input once: 4sbh in fp32, 2sbh under autocast (its 16-bit cast), as the paper counts. With the
  three projections called one by one (`fused_qkv=False`) autocast casts the input once per Linear (3·2sbh);
- the fused path (`F.scaled_dot_product_attention`, a flash-type kernel) saves Q, K, V, its output and the
  log-sum-exp [b, a, s] in fp32 — no s² term; its output is laid out [b, s, a, d], so the out_proj input is a
  view of it, not a copy. On a CPU with dropout > 0 the kernel is not used: the math fallback saves what the
  naive path does, in fp32 even under autocast (it upcasts bf16/fp16);
- the naive path saves contiguous per-head copies of Q, K (for QKᵀ) and V (for P·V), the softmax output
  (a·s²·b), and with dropout the mask and the dropped probabilities (2 more a·s²·b); on CUDA autocast runs
  the softmax in fp32 and P·V saves a 16-bit cast of the probabilities;
- dropout masks: on a CPU, `F.dropout` multiplies by a mask of the input's dtype (4 or 2 bytes per element);
  on CUDA `native_dropout` keeps a bool mask (1 byte), as the paper counts;
- once per model: the token and position ids (int64, for the embedding backward), the embedding dropout mask,
  the final LayerNorm's input and statistics, the LM head's input, and the loss's log-softmax output
  [b, s, V] in fp32 (CausalLMTask upcasts the logits; the paper's §4.3 also counts 4sbv bytes here) with the
  int64 targets;
- not activations, reported apart: under autocast each Linear saves a 16-bit cast of its weight (the tied
  LM head included): 2 bytes per weight element, alive from the layer's forward to its backward; in fp32
  the stacked q/k/v GEMM saves its concatenated weight, 4·3h² bytes per layer.

Activation checkpointing (Chen et al. 2016; Korthikanti et al. §4.2 "full recomputation", 2sbh per layer in
16 bits): each block keeps only its input (4sbh here, the fp32 residual), and backward rebuilds one block's
activations at a time. The CUDA-only terms (bool masks, fp32 softmax in the naive path, the memory-efficient
kernel's log-sum-exp padded to a multiple of 32 in fp32) follow PyTorch's autocast op lists and kernels and
are not measured on this machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]
DeviceKind = Literal["cpu", "cuda"]
Attention = Literal["naive", "fused"]

__all__ = [
    "ActivationEstimate",
    "ActivationShape",
    "Term",
    "estimate_activations",
    "layer_terms",
    "model_terms",
]


@dataclass(frozen=True)
class ActivationShape:
    """What the activation memory of one micro-batch on one rank depends on."""

    batch: int  # b: sequences in one micro-batch on this rank
    seq: int  # s: tokens per sequence
    hidden: int  # h = n_embd
    heads: int  # a = n_head
    layers: int  # L = n_layer
    vocab: int  # V
    dropout: float = 0.0
    attention: Attention = "fused"
    precision: Precision = "fp32"  # fp32, or bf16 / fp16 autocast over fp32 weights (our Trainer)
    device: DeviceKind = "cpu"
    checkpointing: bool = False
    fused_qkv: bool = True  # q, k, v from one stacked GEMM (MultiHeadAttention.fused_qkv)

    def __post_init__(self) -> None:
        if min(self.batch, self.seq, self.hidden, self.heads, self.layers, self.vocab) < 1:
            raise ValueError("batch, seq, hidden, heads, layers and vocab must be >= 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r}: fp32, bf16 or fp16 (resolve 'auto' first)")
        if self.attention not in ("naive", "fused") or self.device not in ("cpu", "cuda"):
            raise ValueError("attention must be naive or fused, device cpu or cuda")


@dataclass(frozen=True)
class Term:
    """One kind of saved tensor: `copies` tensors of `elements` elements of `bytes_per_element` each."""

    name: str
    elements: int
    bytes_per_element: int
    copies: int = 1
    formula: str = ""  # the same in symbols, e.g. "3·2·bsh"

    @property
    def bytes(self) -> int:
        return self.elements * self.bytes_per_element * self.copies


@dataclass
class ActivationEstimate:
    """Activation bytes of one micro-batch on one rank."""

    shape: ActivationShape
    layer: list[Term]  # one transformer block, fully stored (what checkpointing recomputes)
    model: list[Term]  # once per model: embeddings, final LayerNorm, head, loss
    checkpoint_inputs: list[Term] = field(default_factory=list)  # checkpointing: the blocks' inputs
    param_copies: int = 0  # autocast's 16-bit weight casts saved by the Linears (not activations)

    @property
    def layer_bytes(self) -> int:
        return sum(t.bytes for t in self.layer)

    @property
    def model_bytes(self) -> int:
        return sum(t.bytes for t in self.model)

    @property
    def stored(self) -> int:
        """What autograd holds at the end of the forward pass (what SavedTensorMeter measures)."""
        if self.shape.checkpointing:
            return sum(t.bytes for t in self.checkpoint_inputs) + self.model_bytes
        return self.shape.layers * self.layer_bytes + self.model_bytes

    @property
    def recompute(self) -> int:
        """Checkpointing: the one block rebuilt at a time during backward (transient); 0 otherwise."""
        return self.layer_bytes if self.shape.checkpointing else 0

    @property
    def peak(self) -> int:
        """The most held at once: the end of forward, or (checkpointing) the last block's recomputation, by
        when the head's tensors are freed but every block input still is held."""
        if not self.shape.checkpointing:
            return self.stored
        head = sum(t.bytes for t in self.model if t.name in _HEAD_TERMS)
        return max(self.stored, self.stored - head + self.layer_bytes)


# The model terms freed before the first block's backward (the embedding ids and mask live to the end).
_HEAD_TERMS = ("ln_f input", "ln_f mean and rstd", "lm_head input", "log-softmax output", "targets")


def _act_bytes(s: ActivationShape) -> int:
    """Bytes of a Linear's output (and of what reads it): 4 in fp32, 2 under bf16/fp16 autocast."""
    return 4 if s.precision == "fp32" else 2


def _mask_bytes(s: ActivationShape, dtype_bytes: int) -> int:
    """A dropout mask per element: CPU `F.dropout` multiplies by a mask of the input's dtype; CUDA
    `native_dropout` saves a bool mask."""
    return 1 if s.device == "cuda" else dtype_bytes


def _kernel_attention(s: ActivationShape) -> bool:
    """Whether the fused path runs a flash-type kernel (saves Q, K, V, out, lse) rather than the math path.
    CPU: the flash kernel only without dropout; CUDA: flash (16-bit) or memory-efficient (fp32), with
    dropout too."""
    return s.attention == "fused" and (s.device == "cuda" or s.dropout == 0)


def layer_terms(s: ActivationShape) -> list[Term]:
    """Every tensor one GPT block saves for backward (llmlab/models/gpt.py `Block`)."""
    b, t, h, a = s.batch, s.seq, s.hidden, s.heads
    bsh = b * t * h  # elements of one [b, s, h] tensor
    e = _act_bytes(s)
    fp32 = s.precision == "fp32"
    drop = s.dropout > 0
    one_input = fp32 or s.fused_qkv
    qkv_formula = f"{e}bsh" if one_input else "3·2bsh"
    terms = [
        Term("ln_1 input (the block input)", bsh, 4, formula="4bsh"),  # [b, s, h] fp32 residual
        Term("ln_1 mean and rstd", 2 * b * t, 4, formula="8bs"),  # 2 × [b, s, 1] fp32
        # one stacked GEMM, or fp32: one saved LayerNorm output; autocast + three Linears: a 16-bit cast each
        Term("q/k/v_proj input (ln_1 output)", bsh, e, 1 if one_input else 3, qkv_formula),
    ]
    if _kernel_attention(s):
        lse_t = t if s.device == "cpu" or not fp32 else 32 * math.ceil(t / 32)  # mem-efficient pads s
        terms += [
            Term("Q, K, V (SDPA inputs)", bsh, e, 3, formula=f"3·{e}bsh"),  # 3 × [b, a, s, h/a]
            Term("SDPA output = out_proj input", bsh, e, formula=f"{e}bsh"),  # [b, s, a, h/a] one storage
            Term("SDPA log-sum-exp", a * lse_t * b, 4, formula="4abs"),  # [b, a, s] fp32
        ]
    else:
        # naive: in the autocast dtype; the CPU math fallback of the fused path (dropout > 0): fp32
        em = e if s.attention == "naive" else 4
        cuda_amp = s.device == "cuda" and not fp32 and s.attention == "naive"
        sm = 4 if cuda_amp else em  # CUDA autocast runs softmax in fp32
        ass = a * t * t * b  # elements of the [b, a, s, s] probabilities
        terms += [
            Term("Q, K for QKᵀ (per-head copies)", bsh, em, 2, formula=f"2·{em}bsh"),  # [b·a, s, h/a]
            Term("softmax output", ass, sm, formula=f"{sm}as²b"),  # [b, a, s, s]
        ]
        if drop:
            terms.append(Term("attention dropout mask", ass, _mask_bytes(s, sm), formula="as²b"))
        if cuda_amp:  # P·V reads a 16-bit cast of the (dropped) fp32 probabilities
            terms.append(Term("probabilities cast for P·V", ass, e, formula=f"{e}as²b"))
        elif drop:
            terms.append(Term("dropped probabilities (P·V input)", ass, em, formula=f"{em}as²b"))
        terms += [
            Term("V (per-head copy)", bsh, em, formula=f"{em}bsh"),  # [b·a, s, h/a]
            Term("attention output = out_proj input", bsh, e, formula=f"{e}bsh"),  # [b, s, h] copy
        ]
    if drop:
        terms.append(Term("attention residual dropout mask", bsh, _mask_bytes(s, e), formula="bsh·m"))
    terms += [
        Term("ln_2 input", bsh, 4, formula="4bsh"),  # [b, s, h] fp32 residual
        Term("ln_2 mean and rstd", 2 * b * t, 4, formula="8bs"),
        Term("c_fc input (ln_2 output)", bsh, e, formula=f"{e}bsh"),  # [b, s, h]
        Term("GELU input (c_fc output)", 4 * bsh, e, formula=f"{4 * e}bsh"),  # [b, s, 4h]
        Term("c_proj input (GELU output)", 4 * bsh, e, formula=f"{4 * e}bsh"),  # [b, s, 4h]
    ]
    if drop:
        terms.append(Term("MLP dropout mask", bsh, _mask_bytes(s, e), formula="bsh·m"))
    return terms


def model_terms(s: ActivationShape) -> list[Term]:
    """What the model saves once: embeddings, final LayerNorm, LM head and the loss (CausalLMTask)."""
    b, t, h, v = s.batch, s.seq, s.hidden, s.vocab
    bsh = b * t * h
    terms = [
        Term("token ids", b * t, 8, formula="8bs"),  # [b, s] int64, for the embedding backward
        Term("position ids", t, 8, formula="8s"),  # [s] int64
    ]
    if s.dropout > 0:
        terms.append(Term("embedding dropout mask", bsh, _mask_bytes(s, 4), formula="bsh·m"))
    terms += [
        Term("ln_f input", bsh, 4, formula="4bsh"),  # [b, s, h] fp32 residual
        Term("ln_f mean and rstd", 2 * b * t, 4, formula="8bs"),
        Term("lm_head input", bsh, _act_bytes(s), formula=f"{_act_bytes(s)}bsh"),  # [b, s, h]
        Term("log-softmax output", b * t * v, 4, formula="4bsV"),  # [b·s, V] fp32
        Term("targets", b * t, 8, formula="8bs"),  # [b·s] int64
        Term("loss total_weight", 1, 4, formula="4"),  # 0-dim fp32
    ]
    return terms


def estimate_activations(s: ActivationShape) -> ActivationEstimate:
    """The activation bytes of one micro-batch of `s` on one rank, by term."""
    h, v, n = s.hidden, s.vocab, s.layers
    est = ActivationEstimate(shape=s, layer=layer_terms(s), model=model_terms(s))
    if s.checkpointing:  # each checkpoint keeps its block's input: the fp32 residual [b, s, h]
        bsh = s.batch * s.seq * h
        est.checkpoint_inputs = [Term("block inputs (checkpointed)", bsh, 4, n, formula="4bsh·L")]
    if s.precision != "fp32":
        # 16-bit weight casts saved by the Linears: q, k, v, out (4h²), c_fc and c_proj (8h²) per block
        # (inside checkpointed blocks they are recomputed), and the tied LM head (V·h)
        blocks = 0 if s.checkpointing else n * 12 * h * h
        est.param_copies = 2 * (blocks + v * h)
    elif s.fused_qkv and not s.checkpointing:
        est.param_copies = 4 * n * 3 * h * h  # the stacked fp32 q/k/v weight each block's GEMM saves
    return est
